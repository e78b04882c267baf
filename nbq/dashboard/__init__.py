"""nbq's dashboard: a live web page of a broker's workers, queues, tasks and maps, with control.

The top layer but one: it uses the client (Client.events, status, control) and the tasks layer
(AsyncResult.revoke); only the app layer (``nbq dashboard`` in cli/, and jupyter_ext/, which
serves the same handlers inside Jupyter) imports it.

state.py folds events into the picture, series.py its time series; source.py keeps one
broker's State current; handlers.py serves it (live.py pushes deltas, actions.py runs
control, metrics.py formats /metrics); auth.py and server.py make the standalone server;
static/ is the page (plain HTML, CSS and JavaScript: no build step).
"""
