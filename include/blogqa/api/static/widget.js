/* blogqa widget: the questions and answers of this page, and an "ask about this article" box.
 *
 * Add one tag where the widget should appear (or give data-target="#some-element"):
 *   <script src="https://blogqa.example.com/widget.js" async></script>
 * Optional attributes: data-url (the page's URL as enqueued; default: this page's address
 * without its #fragment), data-title (the heading), data-target (a CSS selector).
 *
 * No dependencies, no cookies, no requests to anyone but the API this script came from.
 * Built with DOM calls and textContent only (nothing from the API is parsed as HTML).
 * Keyboard: every question is a button (Enter or Space opens it; Tab moves on), following the
 * WAI-ARIA accordion pattern; answers to typed questions arrive in a polite live region.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.src) return;
  var api = script.src.replace(/\/widget\.js(\?.*)?$/, "");
  var pageUrl = script.getAttribute("data-url") || location.href.split("#")[0];
  var heading = script.getAttribute("data-title") || "Questions about this article";
  var uid = "blogqa-" + Math.random().toString(36).slice(2, 8);

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      node.setAttribute(name, attrs[name]);
    });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function request(path, body) {
    var options = { credentials: "omit", headers: { Accept: "application/json" } };
    if (body) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(api + path, options).then(function (response) {
      return response.json().then(function (data) {
        if (!response.ok) {
          var wait = response.headers.get("Retry-After");
          var detail = typeof data.detail === "string" ? data.detail : "request refused";
          throw new Error(wait ? "Too many questions: try again in " + wait + " s." : detail);
        }
        return data;
      });
    });
  }

  var style = el("style", {},
    ".blogqa{font:inherit;border:1px solid rgba(128,128,128,.4);border-radius:6px;padding:12px 16px;margin:24px 0}" +
    ".blogqa h2{font-size:1.15em;margin:0 0 8px}.blogqa h3{font-size:1em;margin:0}" +
    ".blogqa .blogqa-q{all:unset;display:block;width:100%;cursor:pointer;padding:6px 0;font-weight:600}" +
    ".blogqa .blogqa-q:focus-visible,.blogqa input:focus-visible,.blogqa button:focus-visible{outline:2px solid #3182ce;outline-offset:2px}" +
    ".blogqa .blogqa-q::before{content:'\\25B8  '}.blogqa .blogqa-q[aria-expanded=true]::before{content:'\\25BE  '}" +
    ".blogqa .blogqa-a{margin:0 0 8px 1.2em}.blogqa form{display:flex;gap:8px;margin-top:12px;flex-wrap:wrap}" +
    ".blogqa input{flex:1;min-width:12em;padding:6px}.blogqa .blogqa-out{margin-top:8px}" +
    ".blogqa-sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}");

  function render(page) {
    var section = el("section", { "class": "blogqa", "aria-labelledby": uid + "-h" });
    section.appendChild(el("h2", { id: uid + "-h" }, heading));
    page.questions.forEach(function (qa, i) {
      var qid = uid + "-q" + i, aid = uid + "-a" + i;
      var h = el("h3", {});
      var button = el("button", {
        type: "button", "class": "blogqa-q", id: qid, "aria-expanded": "false", "aria-controls": aid
      }, qa.question);
      var panel = el("div", { id: aid, role: "region", "aria-labelledby": qid, "class": "blogqa-a" }, qa.answer);
      panel.hidden = true;
      button.addEventListener("click", function () {
        var open = button.getAttribute("aria-expanded") === "true";
        button.setAttribute("aria-expanded", open ? "false" : "true");
        panel.hidden = open;
      });
      h.appendChild(button);
      section.appendChild(h);
      section.appendChild(panel);
    });

    var form = el("form", { role: "search", "aria-label": "Ask about this article" });
    var label = el("label", { "for": uid + "-ask", "class": "blogqa-sr" }, "Ask about this article");
    var input = el("input", {
      id: uid + "-ask", type: "text", name: "question", required: "", minlength: "3",
      maxlength: "500", autocomplete: "off", placeholder: "Ask about this article"
    });
    var submit = el("button", { type: "submit" }, "Ask");
    var out = el("div", { "class": "blogqa-out", role: "status", "aria-live": "polite", id: uid + "-out" });
    form.appendChild(label);
    form.appendChild(input);
    form.appendChild(submit);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var question = input.value.trim();
      if (question.length < 3) return;
      submit.disabled = true;
      out.setAttribute("aria-busy", "true");
      out.textContent = "Looking in this article…";
      request("/widget/v1/ask", { url: page.url, question: question }).then(function (data) {
        out.textContent = "";
        out.appendChild(el("p", { "class": "blogqa-answer" }, data.answer));
        if (data.provider === "local") {
          out.appendChild(el("p", { "class": "blogqa-note" }, "(a sentence of the article, chosen without a language model)"));
        }
      }).catch(function (error) {
        out.textContent = error.message || "The question could not be answered.";
      }).then(function () {
        submit.disabled = false;
        out.removeAttribute("aria-busy");
      });
    });
    section.appendChild(form);
    section.appendChild(out);
    return section;
  }

  request("/widget/v1/page?url=" + encodeURIComponent(pageUrl)).then(function (page) {
    var where = script.getAttribute("data-target");
    var target = where ? document.querySelector(where) : null;
    var section = render(page);
    document.head.appendChild(style);
    if (target) {
      target.appendChild(section);
    } else {
      script.parentNode.insertBefore(section, script.nextSibling);
    }
  }).catch(function () {
    /* no questions for this page (yet): show nothing */
  });
})();
