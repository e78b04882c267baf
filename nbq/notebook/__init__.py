"""nbq in Jupyter: the %nbq and %%remote magics and the ipywidgets progress display.

Importing this package imports nothing: workers import ``remotecell`` alone to
run a remote cell, so they never load IPython's magics.  The magics are loaded
by ``%load_ext nbq``; the widget display is found by nbq/client/progress.py through
the ``nbq.display`` entry point.
"""
