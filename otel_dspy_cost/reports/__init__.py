"""Reports: `spend_report()` (`spend`), run artifacts and `record_run()` (`artifacts`), and the `report`
command's tables read back from a run directory (`run_report`).
"""
