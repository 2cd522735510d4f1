// Rendering model output. The text is untrusted: it only ever becomes text nodes
// (createTextNode / textContent) inside elements this code chooses. No innerHTML, no
// insertAdjacentHTML, no attribute taken from the text except an http(s) link target
// checked with the URL parser. "<script>" in a reply is shown as the characters
// "<script>".
//
// The Markdown understood is a small, common subset: ``` fenced code, `code`, **bold**,
// *italic*, # headings, - and 1. lists, > quotes, [text](https://link), paragraphs.

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=[^\s*])([^*]*?[^\s*])\*|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

function safeHref(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) { // matchAll works on a copy: safe to recurse
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    let node;
    if (m[1] !== undefined) {
      node = document.createElement("code");
      node.textContent = m[2];
    } else if (m[3] !== undefined) {
      node = document.createElement("strong");
      node.append(...inline(m[3]));
    } else if (m[4] !== undefined) {
      node = document.createElement("em");
      node.append(...inline(m[4]));
    } else {
      const href = safeHref(m[6]);
      if (href === null) {
        node = document.createTextNode(m[0]);
      } else {
        node = document.createElement("a");
        node.setAttribute("href", href);
        node.setAttribute("rel", "noopener noreferrer nofollow");
        node.setAttribute("target", "_blank");
        node.textContent = m[5];
      }
    }
    out.push(node);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

function block(tag, children) {
  const el = document.createElement(tag);
  el.append(...children);
  return el;
}

// Markdown text -> an array of DOM nodes.
export function markdown(text) {
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [];
  const flush = () => {
    if (para.length) out.push(block("p", inline(para.join("\n"))));
    para = [];
  };
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && lines[i].trim() !== m[1]) {
        body.push(lines[i]);
        i += 1;
      }
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      if (m[2]) code.dataset.lang = m[2];
      out.push(block("pre", [code]));
    } else if ((m = HEADING.exec(line))) {
      flush();
      out.push(block(`h${Math.min(6, m[1].length + 2)}`, inline(m[2])));
    } else if (RULE.test(line)) {
      flush();
      out.push(document.createElement("hr"));
    } else if (BULLET.test(line) || ORDERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      const start = ordered ? Number(ORDERED.exec(line)[1]) : 1;
      if (ordered && start !== 1) list.setAttribute("start", String(start));
      while (i < lines.length) {
        const item = ordered ? ORDERED.exec(lines[i]) : BULLET.exec(lines[i]);
        if (!item) break;
        list.append(block("li", inline(ordered ? item[2] : item[1])));
        i += 1;
      }
      i -= 1;
      out.push(list);
    } else if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        quoted.push(m[1]);
        i += 1;
      }
      i -= 1;
      out.push(block("blockquote", markdown(quoted.join("\n"))));
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
  }
  flush();
  return out;
}

// Puts model output into el: as Markdown drawn by markdown(), or as plain text.
export function renderInto(el, text, mode = "markdown") {
  if (mode === "markdown") {
    el.replaceChildren(...markdown(text));
    el.classList.remove("plain");
  } else {
    el.textContent = String(text);
    el.classList.add("plain");
  }
  return el;
}
