// Live updates without a polling loop: the server pushes a message (server-sent events) when
// the watched state changes, and the page then fetches the fragments that show it.
(function () {
  const live = document.body.dataset.live;
  if (!live) return;
  let busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    const parts = Array.from(document.querySelectorAll("[data-fragment]"));
    Promise.all(parts.map(function (el) {
      return fetch(el.dataset.fragment, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) el.innerHTML = html; });
    })).finally(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }
  const events = new EventSource(live);
  // What changed between the page's rendering and the stream's (re)opening is not pushed:
  // read the parts again each time the stream opens.
  events.addEventListener("open", refresh);
  events.addEventListener("status", refresh);
  events.addEventListener("event", function (message) {
    const e = JSON.parse(message.data);
    const table = document.getElementById("events");
    if (!table) return;
    const row = table.insertRow(1);
    [e.time, e.reason, e.replica, e.message].forEach(function (text) {
      row.insertCell().textContent = text;
    });
    refresh();
  });
})();
