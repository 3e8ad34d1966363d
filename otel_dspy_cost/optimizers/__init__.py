"""Optimizers: what a compile run is made of (`runs`), estimates before one (`estimate`), and
`guarded_compile()`, which keeps the best program found when a budget stops the run (`guarded`).
"""
