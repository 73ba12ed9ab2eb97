// Gallery paging and filtering for the vlmpipe report. All data comes from the embedded JSON;
// every string from it is set with textContent, never parsed as HTML. State lives in the URL hash.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var PAGE = data.pageSize;
  var state = {}; // gallery element id -> {filter, page}

  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i <= 0) return;
      // A hand-edited hash with a stray % must not stop the gallery from rendering.
      try {
        out[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
      } catch (e) { /* ignore the malformed pair */ }
    });
    return out;
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function clip(s, n) { return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }

  // Items of a gallery after filtering, as {image, truth, pred, predClass, raw, id} objects.
  function items(g, filter) {
    var kind = g.dataset.kind, idx = +g.dataset.index;
    if (kind === "stage") {
      var st = data.stages[idx], inv = st.labels.length, cell = null;
      var m = /^cell:(\d+):(\d+)$/.exec(filter);
      if (m) cell = [+m[1], +m[2]];
      return st.rows.filter(function (r) {
        if (cell) return r[2] === cell[0] && r[3] === cell[1];
        if (filter === "correct") return r[2] === r[3];
        if (filter === "misclassified") return r[2] !== r[3];
        if (filter === "invalid") return r[3] === inv;
        return true;
      }).map(function (r) {
        var invalid = r[3] === inv, ok = r[2] === r[3];
        return {
          id: r[0], image: r[1], truth: st.labels[r[2]] || "?",
          pred: invalid ? "invalid" : st.labels[r[3]],
          cls: ok ? "ok" : invalid ? "invalid" : "wrong",
          raw: r[4], showRaw: invalid || r[4].trim() !== st.labels[r[3]]
        };
      });
    }
    var ch = data.changes[idx - 1];
    return ch.rows.filter(function (r) {
      return filter === "all" || !filter || r[0] === filter;
    }).map(function (r) {
      return {
        id: r[1], image: r[2], truth: r[3], pred: r[5], cls: r[0] === "fixed" ? "ok" : "wrong",
        raw: "before (" + data.stages[0].name + "): " + r[4], showRaw: true, change: r[0]
      };
    });
  }

  function card(it) {
    var f = el("figure", "sample " + it.cls);
    f.dataset.row = it.id;
    var box = el("div", "img");
    var src = data.images[it.image];
    if (src) {
      var img = el("img");
      img.loading = "lazy";
      img.alt = it.image;
      img.src = src;
      box.appendChild(img);
    } else if (data.imageErrors[it.image]) {
      box.className = "img none error";
      box.textContent = "image not shown";
      box.title = data.imageErrors[it.image];
    } else {
      box.className = "img none";
      box.textContent = data.embeddedLimit ? "thumbnail not embedded" : "no image";
      box.title = data.embeddedLimit
        ? "this report embeds " + data.embeddedLimit + " thumbnails, misclassified samples first"
        : it.image ? "the image source has no image " + it.image : "no usable image: " + it.raw;
    }
    f.appendChild(box);
    var cap = el("figcaption");
    var l1 = el("div", "l"); l1.appendChild(el("span", "k", "truth")); l1.appendChild(el("span", "t", it.truth));
    var l2 = el("div", "l"); l2.appendChild(el("span", "k", it.change ? "now" : "pred"));
    l2.appendChild(el("span", "p " + it.cls, it.pred));
    cap.appendChild(l1); cap.appendChild(l2);
    if (it.showRaw) {
      var raw = el("div", "raw", clip(it.raw, 160));
      raw.title = it.raw;
      cap.appendChild(raw);
    }
    cap.appendChild(el("div", "id", "row " + it.id));
    f.appendChild(cap);
    return f;
  }

  function render(g) {
    var s = state[g.id];
    var list = items(g, s.filter);
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    s.page = Math.min(Math.max(1, s.page), pages);
    var start = (s.page - 1) * PAGE, slice = list.slice(start, start + PAGE);
    g.dataset.filter = s.filter;
    g.dataset.total = list.length;
    g.querySelectorAll(".filters a").forEach(function (a) {
      a.classList.toggle("active", a.dataset.filter === s.filter);
    });
    var grid = g.querySelector(".grid");
    grid.textContent = "";
    slice.forEach(function (it) { grid.appendChild(card(it)); });
    if (!slice.length) grid.appendChild(el("div", "empty", "No samples match this filter."));
    var status = g.querySelector(".status");
    status.textContent = list.length
      ? "showing " + (start + 1) + "\u2013" + (start + slice.length) + " of " + list.length
      : "";
    var m = /^cell:(\d+):(\d+)$/.exec(s.filter);
    if (m && g.dataset.kind === "stage") {
      var st = data.stages[+g.dataset.index];
      var note = el("span", "cellnote", "truth " + st.labels[+m[1]] + " \u2192 predicted " +
        (+m[2] === st.labels.length ? "invalid" : st.labels[+m[2]]));
      var clear = el("a", "", "clear");
      clear.href = "#stage=" + g.dataset.index + "&filter=all";
      note.appendChild(clear);
      status.appendChild(document.createTextNode(" "));
      status.appendChild(note);
    }
    var pager = g.querySelector(".pager");
    pager.textContent = "";
    if (pages > 1) {
      var prev = el("button", "", "\u2190 prev"), next = el("button", "", "next \u2192");
      prev.disabled = s.page <= 1; next.disabled = s.page >= pages;
      prev.onclick = function () { go(g, s.filter, s.page - 1); };
      next.onclick = function () { go(g, s.filter, s.page + 1); };
      pager.appendChild(prev); pager.appendChild(el("span", "", "page " + s.page + " / " + pages)); pager.appendChild(next);
    }
  }

  function key(g) { return g.dataset.kind === "stage" ? "stage" : "compare"; }

  function go(g, filter, page) {
    location.hash = key(g) + "=" + g.dataset.index + "&filter=" + encodeURIComponent(filter) + "&page=" + page;
  }

  function fromHash(scroll) {
    var h = parseHash();
    var target = null;
    if (h.stage !== undefined) target = document.getElementById("g" + h.stage);
    else if (h.compare !== undefined) target = document.getElementById("c" + h.compare);
    if (!target) return;
    state[target.id] = { filter: h.filter || "all", page: parseInt(h.page, 10) || 1 };
    render(target);
    if (scroll) target.scrollIntoView({ block: "start" });
  }

  var galleries = document.querySelectorAll(".gallery");
  galleries.forEach(function (g) { state[g.id] = { filter: "all", page: 1 }; render(g); });
  fromHash(false);
  window.addEventListener("hashchange", function () { fromHash(true); });
})();
