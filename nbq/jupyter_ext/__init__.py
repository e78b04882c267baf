"""nbq's Jupyter server extension: the dashboard (nbq/dashboard/) at ``<base_url>/nbq/``
under the Jupyter server, behind Jupyter's own auth (and so behind JupyterHub's proxy).

``pip install nbq`` enables it: the wheel puts ``etc/jupyter/jupyter_server_config.d/nbq.json``
in the environment's config path, naming this module in ``ServerApp.jpserver_extensions``.

Which broker: the page's ``?broker=ADDRESS``, else the server's ``NBQ_BROKER``.  The
extension sets NBQ_DASHBOARD_URL (the dashboard's path, base_url included) in the server's
environment, which the kernels it starts inherit: a Client's and a cluster's HTML repr
there link to ``NBQ_DASHBOARD_URL?broker=<their broker>``.

JupyterLab's side panel is a prebuilt lab extension (source: labextension/ at the top of the
repository; built into labextension/ here, which the wheel installs as
share/jupyter/labextensions/@nbq/jupyterlab-dashboard): an iframe of this page in its
``?glance=1`` form, for the broker the page last showed in that browser.
"""
from __future__ import annotations

import os

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado.web import HTTPError

from ..client.status import DASHBOARD_ENV
from ..dashboard.handlers import routes
from ..dashboard.live import Hub
from ..dashboard.source import Sources


class JupyterGuard(JupyterHandler):
    """Lets through only the Jupyter server's authenticated users; others get 403, never
    the login page's redirect (a data request has no page to go back to)."""

    auth_resource = "nbq"

    async def prepare(self) -> None:
        await super().prepare(_redirect_to_login=False)
        user = self.current_user
        if not user or not self.authorizer.is_authorized(self, user, "read", self.auth_resource):
            raise HTTPError(403)


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "nbq.jupyter_ext"}]


def _load_jupyter_server_extension(serverapp) -> None:
    """Add the dashboard's routes under base_url/nbq/ and tell kernels where it is."""
    web_app = serverapp.web_app
    prefix = url_path_join(web_app.settings["base_url"], "nbq/")
    web_app.add_handlers(".*$", routes(prefix, JupyterGuard, Sources(os.environ.get("NBQ_BROKER")),
                                       Hub()))
    os.environ[DASHBOARD_ENV] = prefix
    serverapp.log.info("nbq dashboard at %s (?broker=ADDRESS)", prefix)
