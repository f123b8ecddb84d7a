/* slmops dashboard: refresh the parts of a page marked data-live="URL" every data-every-s seconds.
   Hand-written, no library. Without JavaScript the page offers a plain reload link instead. */
(function () {
  "use strict";
  function start(el) {
    var url = el.getAttribute("data-live");
    var every = Math.max(1, parseFloat(el.getAttribute("data-every-s") || "3")) * 1000;
    var status = document.getElementById(el.getAttribute("data-status") || "");
    function tick() {
      if (el.getAttribute("data-live-stop") === "1") { return; }
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "live" } })
        .then(function (answer) {
          if (answer.redirected || answer.status === 401 || answer.status === 303) {
            window.location.reload();
            return null;
          }
          if (!answer.ok) { throw new Error("HTTP " + answer.status); }
          return answer.text();
        })
        .then(function (html) {
          if (html === null) { return; }
          el.innerHTML = html;
          var inner = el.querySelector("[data-final]");
          if (inner && inner.getAttribute("data-final") === "1") { el.setAttribute("data-live-stop", "1"); }
          if (status) { status.textContent = "updated " + new Date().toLocaleTimeString(); }
        })
        .catch(function (err) {
          if (status) { status.textContent = "refresh failed (" + err.message + "); retrying"; }
        })
        .then(function () { window.setTimeout(tick, every); });
    }
    window.setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    var live = document.querySelectorAll("[data-live]");
    for (var i = 0; i < live.length; i++) { start(live[i]); }
  });
})();
