// nbq's JupyterLab extension: a side panel with the workers and maps of the broker last opened
// in the dashboard (the dashboard at <base_url>/nbq/, in ?glance=1 form), and a command and a
// button that open the whole dashboard in a Lab tab. Plain JavaScript, built by nbq's
// maintainers (`jlpm install && jlpm build` here) into nbq/jupyter_ext/labextension/, which
// the wheel installs as share/jupyter/labextensions/@nbq/jupyterlab-dashboard: users build
// nothing.
import { ILabShell } from "@jupyterlab/application";
import { ICommandPalette, MainAreaWidget } from "@jupyterlab/apputils";
import { PageConfig, URLExt } from "@jupyterlab/coreutils";
import { Widget } from "@lumino/widgets";

const BROKER_KEY = "nbq-dashboard-broker"; // the dashboard page stores the broker it shows
const OPEN = "nbq:open-dashboard";

function dashboardUrl(glance) {
  const query = new URLSearchParams();
  const broker = window.localStorage.getItem(BROKER_KEY);
  if (broker) query.set("broker", broker);
  if (glance) query.set("glance", "1");
  const q = query.toString();
  return URLExt.join(PageConfig.getBaseUrl(), "nbq/") + (q ? `?${q}` : "");
}

/** The dashboard in an iframe; in the side panel (glance), with a button to open it in a tab. */
class DashboardFrame extends Widget {
  constructor(glance, commands) {
    super();
    this.glance = glance;
    this.addClass("nbq-dashboard-frame");
    Object.assign(this.node.style, { display: "flex", flexDirection: "column" });
    if (glance) {
      const open = document.createElement("button");
      open.textContent = "Open the nbq dashboard in a tab";
      open.className = "jp-Button jp-mod-styled jp-mod-accept nbq-open-dashboard";
      Object.assign(open.style, { margin: "6px", height: "auto", minHeight: "28px", flex: "none" });
      open.onclick = () => commands.execute(OPEN);
      this.node.appendChild(open);
    }
    this.frame = document.createElement("iframe");
    Object.assign(this.frame.style, { flex: "1", border: "0", width: "100%" });
    this.node.appendChild(this.frame);
  }

  onAfterShow() {
    const url = dashboardUrl(this.glance);
    if (this.frame.getAttribute("src") !== url) this.frame.setAttribute("src", url);
  }
}

const plugin = {
  id: "@nbq/jupyterlab-dashboard:plugin",
  description: "nbq's dashboard in a side panel and a Lab tab",
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette],
  activate: (app, shell, palette) => {
    app.commands.addCommand(OPEN, {
      label: "Open the nbq dashboard",
      execute: () => {
        const content = new DashboardFrame(false, app.commands);
        const tab = new MainAreaWidget({ content });
        tab.id = `nbq-dashboard-${Date.now()}`;
        tab.title.label = "nbq dashboard";
        tab.title.closable = true;
        shell.add(tab, "main");
        shell.activateById(tab.id);
        content.onAfterShow();
      },
    });
    if (palette) palette.addItem({ command: OPEN, category: "nbq" });
    const panel = new DashboardFrame(true, app.commands);
    panel.id = "nbq-panel";
    panel.title.label = "nbq";
    panel.title.caption = "nbq: workers and maps";
    shell.add(panel, "left", { rank: 900 });
  },
};

export default plugin;
