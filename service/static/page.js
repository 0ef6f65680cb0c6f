// The try-it page: images in (drop, pick, paste), one POST /classify per image, the top-5 as bars; on
// request, POST /explain for a card's image ("Where it looks": the Grad-CAM overlay in place of the
// preview), and GET /model/filters.png under the model chip (conv1's kernels, the paper's Fig. 3).
// No framework and no dependency; it uses the HTTP API exactly as documented at /docs.
"use strict";

const TOP_K = 5;
const PARALLEL = 3; // requests in flight at once: the server batches them, the page stays responsive
const MAX_RETRIES = 3; // for 503 answers that carry Retry-After (queue full, model loading)

const el = {
  drop: document.getElementById("drop"),
  input: document.getElementById("file-input"),
  crops: document.getElementById("crops"),
  clear: document.getElementById("clear"),
  results: document.getElementById("results"),
  announce: document.getElementById("announce"),
  model: document.getElementById("model"),
  untrained: document.getElementById("untrained"),
  filters: document.getElementById("filters-image"),
  template: document.getElementById("card-template"),
};

const items = []; // {file, name, card, url, state}
const queue = [];
let running = 0;
let pasted = 0;
let filtersKey = null; // which model's conv1 picture is shown

// Model shown in the header ------------------------------------------------------------------------------

function modelName(model) {
  return model.checkpoint || "untrained net (no checkpoint)";
}

function modelDetails(model) {
  const parts = [];
  if (model.epoch != null) parts.push(`epoch ${model.epoch}`);
  if (model.val_top5_error != null) parts.push(`val top-5 error ${percent(model.val_top5_error)}`);
  return parts.join(" · ");
}

// "trained" says where the weights came from (training or an import, not a fresh initialisation), not
// how good they are: the validation error, shown with it, says that (a first epoch is at chance level).
function validation(model) {
  return model.val_top1_error != null ? `val top-1 error ${percent(model.val_top1_error)}` : "no validation error recorded";
}

const TRAINED_TITLE =
  "The weights come from training or an import, not a fresh initialisation; the validation error says how good they are.";

function pill(model) {
  const span = document.createElement("span");
  span.className = model.trained ? "pill" : "pill untrained";
  span.textContent = model.trained ? `trained · ${validation(model)}` : "untrained: labels are noise";
  if (model.trained) span.title = TRAINED_TITLE;
  return span;
}

function showModel(model) {
  const name = document.createElement("span");
  name.className = "model-name";
  name.textContent = modelName(model);
  const details = document.createElement("span");
  details.className = "model-details";
  details.textContent = modelDetails(model);
  el.model.replaceChildren(name, pill(model), details);
  el.model.title = model.sha256 ? `sha256 ${model.sha256}` : "";
  el.untrained.hidden = model.trained;
  showFilters(model);
}

// conv1's kernels of the model that answered last: a new picture when a reload brought other weights (the
// query only tells the browser's image cache apart; the server revalidates by ETag anyway).
function showFilters(model) {
  const key = model.sha256 || `untrained ${model.checkpoint || ""}`;
  if (key === filtersKey) return;
  filtersKey = key;
  el.filters.src = `model/filters.png?model=${encodeURIComponent(key)}`;
}

function showModelText(text) {
  const span = document.createElement("span");
  span.className = "model-name";
  span.textContent = text;
  el.model.replaceChildren(span);
}

async function loadModel(attempt = 0) {
  try {
    const response = await fetch("model", { headers: { Accept: "application/json" } });
    if (response.ok) {
      showModel((await response.json()).model);
      return;
    }
    if (response.status === 503 && attempt < 60) {
      showModelText("model loading…");
      setTimeout(() => loadModel(attempt + 1), 1000);
      return;
    }
    showModelText(`model unavailable (${await problemText(response)})`);
  } catch (error) {
    showModelText("cannot reach the server");
  }
}

// Adding images ----------------------------------------------------------------------------------------------

function addFiles(files) {
  const added = [];
  for (const file of files) {
    let name = file.name;
    if (!name || name === "image.png") name = `pasted image ${++pasted}`;
    const url = URL.createObjectURL(file); // the preview: the file itself, never uploaded for it
    const item = { file, name, url, card: newCard(name, url, file.type), state: "pending", top: null, look: null };
    items.push(item);
    added.push(item);
  }
  if (!added.length) return;
  const fragment = document.createDocumentFragment();
  for (const item of added) fragment.append(item.card);
  el.results.prepend(fragment); // the newest images first, in the order given
  el.clear.disabled = false;
  el.announce.textContent = added.length === 1 ? `Classifying ${added[0].name}…` : `Classifying ${added.length} images…`;
  for (const item of added) enqueue(item);
}

function newCard(name, url, type) {
  const card = el.template.content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = name;
  card.querySelector(".filename").title = name;
  const img = card.querySelector("img");
  img.alt = `Preview of ${name}`;
  img.addEventListener("error", () => {
    img.replaceWith(document.createTextNode(noPreview(type)));
  });
  img.src = url;
  return card;
}

// Why a file shows no preview: the browser cannot draw some image formats (TIFF, say), but a file of
// another type (text/plain) is not an image at all, and the browser is not to blame.
function noPreview(type) {
  if (type.startsWith("image/")) return "no preview in this browser";
  return type ? `no preview: not an image (${type})` : "no preview: not an image the browser knows";
}

// Where it looks ----------------------------------------------------------------------------------------------
// One POST /explain per press, for the class the card shows first; the PNG replaces the preview until pressed
// again. The server computes one explanation at a time: a busy answer (503, Retry-After) is retried.

function lookFor(item) {
  const look = item.look;
  if (look && look.url) return showLook(item, !look.shown);
  if (look && look.busy) return;
  explain(item);
}

async function explain(item, attempt = 0) {
  const top = item.top;
  const look = (item.look = { busy: true, url: null, shown: false, top });
  const button = item.card.querySelector(".look");
  const status = item.card.querySelector(".look-status");
  button.disabled = true;
  status.className = "look-status";
  status.textContent = "looking…";
  const form = new FormData();
  form.append("file", item.file, item.name);
  let response;
  try {
    response = await fetch(`explain?class_index=${encodeURIComponent(top.index)}`, { method: "POST", body: form });
  } catch (error) {
    return lookFailed(item, look, `cannot reach the server (${error.message})`);
  }
  if (item.look !== look || !item.card.isConnected) return; // classified again, or cleared, meanwhile
  const retryAfter = Number(response.headers.get("Retry-After"));
  if (response.status === 503 && retryAfter > 0 && attempt < MAX_RETRIES) {
    status.textContent = `server busy, retrying in ${retryAfter} s…`;
    await new Promise((resolve) => setTimeout(resolve, retryAfter * 1000));
    if (item.look !== look) return;
    return explain(item, attempt + 1);
  }
  if (!response.ok) return lookFailed(item, look, await problemText(response));
  const blob = await response.blob();
  if (item.look !== look) return;
  look.busy = false;
  look.url = URL.createObjectURL(blob);
  look.probability = Number(response.headers.get("X-Class-Probability"));
  look.noEvidence = Number(response.headers.get("X-Heatmap-Max")) === 0;
  button.disabled = false;
  showLook(item, true);
}

function lookFailed(item, look, detail) {
  if (item.look !== look) return;
  item.look = null;
  const status = item.card.querySelector(".look-status");
  status.className = "look-status error";
  status.textContent = detail;
  item.card.querySelector(".look").disabled = false;
}

function showLook(item, shown) {
  const look = item.look;
  const preview = item.card.querySelector(".preview");
  if (!look.photo) look.photo = [...preview.childNodes]; // the preview (or its "no preview" text) to go back to
  look.shown = shown;
  if (shown) {
    const img = document.createElement("img");
    img.className = "look-image";
    img.alt = `Where the network finds “${look.top.label}” in ${item.name} (red: most evidence)`;
    img.src = look.url;
    preview.replaceChildren(img);
  } else {
    preview.replaceChildren(...look.photo);
  }
  preview.classList.toggle("explained", shown);
  const button = item.card.querySelector(".look");
  button.setAttribute("aria-pressed", String(shown));
  button.textContent = shown ? "Show the photo" : "Where it looks";
  const status = item.card.querySelector(".look-status");
  status.className = shown && look.noEvidence ? "look-status none" : "look-status";
  status.textContent = shown ? lookText(look) : "";
  item.card.querySelector(".legend").hidden = !shown;
}

function lookText(look) {
  const label = `“${look.top.label}” (centre crop, ${percent(look.probability)})`;
  if (!look.noEvidence) return `evidence for ${label}`;
  // Grad-CAM keeps only what raises the class's score; where nothing does, the map is 0 everywhere and the
  // overlay an even blue tint, which would otherwise read as "a little evidence everywhere".
  return `no evidence for ${label} anywhere in the crop: nothing in it raises the class’s score, so the map is 0 everywhere (the even blue tint)`;
}

function forgetLook(item) {
  const look = item.look;
  if (!look) return;
  if (look.shown) showLook(item, false);
  if (look.url) URL.revokeObjectURL(look.url);
  item.look = null;
  item.card.querySelector(".look-status").textContent = "";
  item.card.querySelector(".legend").hidden = true;
  item.card.querySelector(".look").disabled = false;
}

// Classifying ------------------------------------------------------------------------------------------------

function enqueue(item) {
  setPending(item);
  queue.push(item);
  pump();
}

function pump() {
  while (running < PARALLEL && queue.length) {
    const item = queue.shift();
    running += 1;
    classify(item).finally(() => {
      running -= 1;
      pump();
    });
  }
}

async function classify(item, attempt = 0) {
  const crops = el.crops.value;
  const form = new FormData();
  form.append("file", item.file, item.name);
  const started = performance.now();
  let response;
  try {
    response = await fetch(`classify?top_k=${TOP_K}&crops=${encodeURIComponent(crops)}`, {
      method: "POST",
      body: form,
      headers: { Accept: "application/json" },
    });
  } catch (error) {
    return showError(item, "Network error", `cannot reach the server (${error.message})`);
  }
  const roundTrip = performance.now() - started;
  if (!item.card.isConnected) return; // cleared meanwhile

  const retryAfter = Number(response.headers.get("Retry-After"));
  if (response.status === 503 && retryAfter > 0 && attempt < MAX_RETRIES) {
    setPending(item, `server busy, retrying in ${retryAfter} s…`);
    await new Promise((resolve) => setTimeout(resolve, retryAfter * 1000));
    return classify(item, attempt + 1);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    return showError(item, headline(body, response.status), problemDetail(body, item.name));
  }
  let body;
  try {
    body = await response.json();
  } catch (error) {
    return showError(item, "Unreadable answer", `the server's answer is not JSON (${error.message})`);
  }
  showResult(item, body, roundTrip);
}

function setPending(item, text = "classifying…") {
  forgetLook(item); // the card's classes may change: an explanation of the old top class would mislead
  item.card.querySelector(".look-row").hidden = true;
  item.state = "pending";
  item.card.dataset.state = "pending";
  item.card.setAttribute("aria-busy", "true");
  item.card.querySelector(".status").textContent = text;
}

function showResult(item, body, roundTrip) {
  const card = item.card;
  const result = body.results[0];
  const bars = result.predictions.map((p) => {
    const li = document.createElement("li");
    li.dataset.wnid = p.wnid;
    li.dataset.index = p.index;
    li.dataset.score = p.score;
    li.title = p.wnid;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p.score);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.min(100, p.score * 100)}%`;
    bar.append(fill);
    li.append(label, value, bar);
    return li;
  });
  card.querySelector(".bars").replaceChildren(...bars);

  const model = body.model;
  const meta = card.querySelector(".meta");
  const parts = [
    `${milliseconds(body.timing.total_ms)} on the server, ${milliseconds(roundTrip)} round trip`,
    body.crops === "ten" ? "10 patches" : "centre crop",
    `answered by ${modelName(model)}${answeredDetails(model)}`,
  ];
  meta.replaceChildren(document.createTextNode(parts.join(" · ")));
  if (!model.trained) meta.append(pill(model));
  meta.title = model.sha256 ? `sha256 ${model.sha256}` : "";
  showModel(model); // the model that answered last (the server may have hot-reloaded a new checkpoint)

  item.state = "done";
  card.dataset.state = "done";
  card.removeAttribute("aria-busy");
  const top = result.predictions[0];
  item.top = top;
  card.querySelector(".look-row").hidden = false;
  el.announce.textContent = `${item.name}: ${top.label}, ${percent(top.score)}` + (model.trained ? "" : " (untrained model)");
}

function answeredDetails(model) {
  if (!model.trained) return "";
  const epoch = model.epoch != null ? `epoch ${model.epoch}, ` : "";
  return ` (${epoch}${validation(model)})`;
}

function showError(item, title, detail) {
  const status = item.card.querySelector(".status");
  const strong = document.createElement("strong");
  strong.className = "title";
  strong.textContent = title;
  const span = document.createElement("span");
  span.className = "detail";
  span.textContent = detail;
  status.replaceChildren(strong, document.createTextNode(": "), span);
  item.card.querySelector(".bars").replaceChildren();
  item.card.querySelector(".meta").replaceChildren();
  item.state = "error";
  item.card.dataset.state = "error";
  item.card.removeAttribute("aria-busy");
  el.announce.textContent = `${item.name}: ${title}: ${detail}`;
}

// The error card's headline, in words, by the problem's type (the README's error table); not the HTTP
// status phrase ("Unprocessable Entity"), which says nothing to a person.
const HEADLINES = {
  "invalid-image": "Not a readable image",
  "unsupported-image": "Not an image format the server reads",
  "image-too-large": "Image too large",
  "body-too-large": "File too large",
  "too-many-files": "Too many files",
  "no-image": "No image sent",
  "invalid-parameter": "Invalid option",
  "body-timeout": "Upload too slow",
  "incomplete-body": "Upload interrupted",
  "malformed-multipart": "Malformed upload",
  "malformed-request": "Malformed upload",
  "not-ready": "Model not loaded yet",
  "model-changing": "Model being replaced",
  "queue-full": "Server busy",
  "memory-busy": "Server busy",
  "inference-failed": "Server error",
  "internal-error": "Server error",
};

function headline(body, status) {
  const slug = body && typeof body.type === "string" ? body.type.replace("urn:alexnet:problem:", "") : "";
  if (HEADLINES[slug]) return HEADLINES[slug];
  return status >= 500 ? "Server error" : "Not classified";
}

// The problem's detail, less the upload's name it starts with ("'note.txt': …"): the card's title says it.
function problemDetail(body, name) {
  const detail = (body && body.detail) || "the server gave no reason";
  for (const quoted of [`'${name}': `, `"${name}": `]) {
    if (detail.startsWith(quoted)) return detail.slice(quoted.length);
  }
  return detail;
}

async function problemText(response) {
  const body = await response.json().catch(() => null);
  return (body && body.detail) || `HTTP ${response.status}`;
}

function percent(fraction) {
  const value = fraction * 100;
  return value > 0 && value < 0.05 ? "<0.1%" : `${value.toFixed(1)}%`;
}

function milliseconds(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

// Wiring -----------------------------------------------------------------------------------------------------

el.drop.addEventListener("click", () => el.input.click());
el.results.addEventListener("click", (event) => {
  const button = event.target.closest(".look");
  if (!button) return;
  const item = items.find((candidate) => candidate.card.contains(button));
  if (item && item.top) lookFor(item);
});
el.input.addEventListener("change", () => {
  addFiles([...el.input.files]);
  el.input.value = ""; // choosing the same file again still fires "change"
});

// Files dropped anywhere on the page count (a miss would make the browser navigate away to the file).
let dragDepth = 0;
const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
window.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  el.drop.classList.add("dragging");
});
window.addEventListener("dragover", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) el.drop.classList.remove("dragging");
});
window.addEventListener("drop", (event) => {
  dragDepth = 0;
  el.drop.classList.remove("dragging");
  if (!event.dataTransfer || !event.dataTransfer.files.length) return;
  event.preventDefault();
  addFiles([...event.dataTransfer.files]);
});

// Pasting an image (a screenshot, a copied picture) anywhere but in a text field.
document.addEventListener("paste", (event) => {
  const files = [...((event.clipboardData && event.clipboardData.files) || [])].filter((f) => f.type.startsWith("image/"));
  if (!files.length) return;
  event.preventDefault();
  addFiles(files);
});

// Another crop mode: classify what is on the page again.
el.crops.addEventListener("change", () => {
  for (const item of items) if (item.state !== "pending") enqueue(item);
});

el.clear.addEventListener("click", () => {
  queue.length = 0;
  for (const item of items) {
    URL.revokeObjectURL(item.url);
    if (item.look && item.look.url) URL.revokeObjectURL(item.look.url);
  }
  items.length = 0;
  el.results.replaceChildren();
  el.clear.disabled = true;
  el.announce.textContent = "Results cleared";
  el.drop.focus();
});

loadModel();
