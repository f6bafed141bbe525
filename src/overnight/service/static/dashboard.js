// The dashboard's only script (no dependencies): every few seconds it fetches the page's
// main part again and puts it in place, keeping which failure lists are open or closed.
(function () {
  "use strict";
  const main = document.getElementById("main");
  if (!main) return;
  const every = 1000 * Number(main.dataset.refresh || 2);
  let busy = false;

  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const params = new URLSearchParams(window.location.search);
      params.delete("retried");
      params.delete("moved");
      params.delete("refused");
      const response = await fetch("/dashboard/main?" + params.toString(), {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      if (response.status === 401) {
        window.location.assign("/"); // the key is gone: the page asks for it again
        return;
      }
      if (!response.ok) return;
      const html = await response.text();
      const open = {};
      main.querySelectorAll("details[data-key]").forEach((d) => {
        open[d.dataset.key] = d.open;
      });
      main.innerHTML = html;
      main.querySelectorAll("details[data-key]").forEach((d) => {
        if (d.dataset.key in open) d.open = open[d.dataset.key];
      });
      main.dataset.updated = String(Date.now());
    } catch (e) {
      // the server is away for a moment: try again at the next tick
    } finally {
      busy = false;
    }
  }

  setInterval(refresh, every);
})();
