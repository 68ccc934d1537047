// vdsm-engine console: live rows by server-sent events, and a task's output followed.
// The pages work without this script (plain links and forms); it only adds liveness.
"use strict";

(function () {
  const status = document.getElementById("live");
  function say(text) { if (status) status.textContent = text; }

  function apply(row) {
    const old = document.getElementById(row.id);
    if (old) {
      if (row.html) old.outerHTML = row.html; else old.remove();
    } else if (row.html && row.prepend) {
      const box = document.getElementById(row.prepend);
      if (box) box.insertAdjacentHTML("afterbegin", row.html);
    } else if (row.html && row.after) {
      const anchor = document.getElementById(row.after);
      if (anchor) anchor.insertAdjacentHTML("afterend", row.html);
    }
  }

  let reloading = null;
  function reload() {
    // Fetch this page again and swap its main region: a bulk change (resync).
    if (reloading) return;
    reloading = setTimeout(function () {
      reloading = null;
      fetch(location.href, { credentials: "same-origin" })
        .then(function (r) { return r.text(); })
        .then(function (text) {
          const fresh = new DOMParser().parseFromString(text, "text/html");
          const main = fresh.getElementById("main");
          const output = document.getElementById("output");
          if (main && !output) document.getElementById("main").replaceWith(main);
          // The fresh page's stream knows its rows: follow that one from now on.
          if (fresh.body.dataset.live && fresh.body.dataset.live !== document.body.dataset.live) {
            document.body.dataset.live = fresh.body.dataset.live;
            listen();
          }
        })
        .catch(function () {});
    }, 500);
  }

  let source = null;
  function listen() {
    const live = document.body.dataset.live;
    if (!live || !window.EventSource) return;
    if (source) source.close();
    source = new EventSource(live);
    source.addEventListener("hello", function () {
      document.body.dataset.connected = "yes";
      say("live");
    });
    source.addEventListener("patch", function (event) {
      JSON.parse(event.data).rows.forEach(apply);
      document.body.dataset.patches = String(Number(document.body.dataset.patches || 0) + 1);
    });
    source.addEventListener("reload", reload);
    source.onerror = function () {
      document.body.dataset.connected = "no";
      say("reconnecting…");
    };
  }
  listen();

  // One task's output, followed while it runs (the engine relays the host's stream).
  const pre = document.getElementById("output");
  const LIMIT = 262144;  // characters kept in the page
  if (pre && pre.dataset.src && window.fetch && window.TextDecoder) {
    fetch(pre.dataset.src, { credentials: "same-origin" }).then(function (response) {
      if (!response.ok || !response.body) {
        pre.textContent = "(no output: HTTP " + response.status + ")";
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      function more() {
        return reader.read().then(function (part) {
          if (part.done) { pre.dataset.ended = "yes"; return; }
          let text = pre.textContent + decoder.decode(part.value, { stream: true });
          if (text.length > LIMIT) text = text.slice(text.length - LIMIT);
          const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.textContent = text;
          if (atEnd) pre.scrollTop = pre.scrollHeight;
          return more();
        });
      }
      return more();
    }).catch(function () { pre.dataset.ended = "error"; });
  }
})();
