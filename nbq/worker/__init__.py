"""Workers: a supervisor (``nbq worker``) keeps N worker processes that fetch, run and report."""
