// medserve review console: keyboard shortcuts on the result page (plain JS, no library, no network).
// a: accept. e: go to the correction. r: go to the reason (Reject then submits it). Ignored while typing.
(function () {
  "use strict";
  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    var form = document.getElementById("decision-form");
    if (!form) { return; }
    var key = event.key.toLowerCase();
    if (key === "a") {
      event.preventDefault();
      document.getElementById("accept").click();
    } else if (key === "e") {
      event.preventDefault();
      var field = document.getElementById("edited_text") || document.getElementById("label");
      if (field) { field.focus(); }
    } else if (key === "r") {
      event.preventDefault();
      document.getElementById("reject").classList.add("armed");
      document.getElementById("comment").focus();
    }
  });
}());
