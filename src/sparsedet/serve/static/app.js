// The web page of `sparsedet serve`: one image at a time, sent as the raw body of POST /v1/predict.
// The page asks for every detection (threshold=0) once per image and filters here, so moving the
// threshold slider redraws at once without asking the server again.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), file: $("file"), drop: $("drop"), threshold: $("threshold"),
  thresholdValue: $("threshold-value"), status: $("status"), detections: $("detections"),
  stage: $("stage"), picture: $("picture"), canvas: $("canvas"), tokens: $("tokens"),
  tokensToggle: $("tokens-toggle"), tokensLayer: $("tokens-layer"), tokensImage: $("tokens-image"),
};

const state = {
  threshold: Number(el.threshold.value), // the model's own until the slider moves (the slider rounds to 0.01)
  seq: 0,         // counts images: an answer for an image that is no longer shown is dropped
  file: null,     // the image shown
  picture: null,  // its decoded pixels (null when the browser cannot show them as the server read them)
  answer: null,   // the /v1/predict answer for it, at threshold 0
  view: null,     // the drawn size in CSS pixels, and the device pixels per CSS pixel
  tokens: null,   // the /v1/tokens request for it (a promise), made once when the overlay is first shown
};

function setStatus(kind, message) {
  el.status.dataset.state = kind;
  el.status.textContent = message;
}

// A JSON request; a refusal throws its {"detail": message} as the error's message.
async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message}); is sparsedet serve still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status line is all there is to tell.
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : null;
    throw new Error(detail || `the server answered ${response.status} ${response.statusText}`);
  }
  if (body === null) throw new Error(`the server's answer to ${path} is not JSON`);
  return body;
}

// The file itself as the body, with its own type: the server needs image/* to accept it.
function postImage(file) {
  return { method: "POST", headers: { "Content-Type": file.type }, body: file };
}

function formatThreshold(t) {
  // Two decimals, as the slider steps; more when the model's own threshold has them.
  return Math.abs(t * 100 - Math.round(t * 100)) > 1e-9 ? t.toFixed(3) : t.toFixed(2);
}

// A colour per class label, spread around the hue circle so that neighbouring labels differ.
function colour(label) {
  return `hsl(${Math.round((label * 137.508) % 360)}, 80%, 40%)`;
}

// As Python's predict keeps them: scores strictly above the threshold.
function shownDetections() {
  return state.answer ? state.answer.detections.filter((d) => d.score > state.threshold) : [];
}

function summary() {
  const shown = shownDetections().length;
  const total = state.answer.detections.length;
  const cannotShow = state.picture ? ""
    : " The browser cannot show this image as the server read it: the boxes are drawn on a blank canvas.";
  return `${state.file.name}: ${shown} of ${total} detections scored above ${formatThreshold(state.threshold)}` +
    ` (${state.answer.time_ms} ms).${cannotShow}`;
}

async function loadModel() {
  let facts;
  try {
    facts = await call("/v1/model");
  } catch (err) {
    el.model.textContent = "The model is unavailable.";
    setStatus("error", `Could not read the model: ${err.message}`);
    return;
  }
  const parts = [facts.weights, facts.preset, `${facts.kind}, ${facts.encoder} encoder`, facts.runtime,
    facts.precision, `${facts.classes.length} classes`];
  el.model.textContent = parts.filter(Boolean).join(" · ");
  el.model.title = `input: short side ${facts.input_size.short_side} px, long side at most ` +
    `${facts.input_size.long_side_max} px; top ${facts.top_k} detections`;
  state.threshold = facts.threshold;
  el.threshold.value = String(facts.threshold);
  el.thresholdValue.textContent = formatThreshold(facts.threshold);
  el.tokens.hidden = !facts.token_overlay; // only a token-sparse PyTorch model has tokens to show
  if (state.answer) render();
}

async function detect(file) {
  const seq = ++state.seq;
  state.picture?.close(); // the previous image's pixels
  Object.assign(state, { file, picture: null, answer: null, tokens: null });
  clearView();
  if (!file.type) {
    // The body must carry an image/* type, and the browser could not tell this file's.
    setStatus("error", `${file.name}: the browser cannot tell what kind of file this is; ` +
      "choose a JPEG, PNG, BMP, WebP or TIFF image.");
    return;
  }
  setStatus("busy", `Detecting objects in ${file.name}…`);
  let answer;
  try {
    answer = await call("/v1/predict?threshold=0", postImage(file));
  } catch (err) {
    if (seq === state.seq) setStatus("error", `${file.name}: ${err.message}`);
    return;
  }
  const picture = await decode(file, answer.image_size);
  if (seq !== state.seq) return; // another image was chosen meanwhile
  Object.assign(state, { answer, picture });
  el.stage.hidden = false;
  layout();
  render();
  setStatus("done", summary());
  if (el.tokensToggle.checked) updateOverlay();
}

// The image's pixels as stored, which is how the server reads them (no EXIF rotation): the boxes
// fit them only. Browsers turn a JPEG by its EXIF orientation, so that tag is set to 1 in a copy
// first. Null when the browser cannot decode the format (TIFF) or still shows another size.
async function decode(file, [height, width]) {
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    const tag = jpegOrientation(bytes);
    if (tag) new DataView(bytes.buffer).setUint16(tag.at, 1, tag.little);
    const picture = await createImageBitmap(new Blob([bytes], { type: file.type }));
    if (picture.width === width && picture.height === height) return picture;
    picture.close();
    return null;
  } catch {
    return null;
  }
}

// Where a JPEG's EXIF orientation value lies ({at, little}: its offset and byte order), or null.
function jpegOrientation(bytes) {
  const view = new DataView(bytes.buffer);
  try {
    if (view.getUint16(0) !== 0xffd8) return null; // not a JPEG
    let at = 2;
    while (view.getUint8(at) === 0xff) {
      const marker = view.getUint8(at + 1);
      if (marker === 0xda) return null; // the pixels start: no more metadata
      if (marker === 0xe1 && view.getUint32(at + 4) === 0x45786966) { // APP1 "Exif"
        const tiff = at + 10;
        const little = view.getUint16(tiff) === 0x4949; // "II": little-endian
        const ifd = tiff + view.getUint32(tiff + 4, little);
        for (let i = 0, n = view.getUint16(ifd, little); i < n; i++) {
          const entry = ifd + 2 + 12 * i;
          if (view.getUint16(entry, little) === 0x0112) return { at: entry + 8, little };
        }
      }
      at += 2 + view.getUint16(at + 2);
    }
  } catch {
    // A truncated header (RangeError): leave the file as it is.
  }
  return null;
}

function clearView() {
  el.stage.hidden = true;
  el.detections.replaceChildren();
  el.detections.removeAttribute("data-ready");
  el.canvas.dataset.drawn = "0";
  el.tokensImage.hidden = true;
  el.tokensImage.removeAttribute("data-layer");
  el.tokensLayer.replaceChildren();
  el.tokensLayer.disabled = true;
}

function render() {
  const shown = shownDetections();
  drawBoxes(shown);
  list(shown);
  if (el.status.dataset.state === "done") setStatus("done", summary()); // a busy or error message stays
}

// The view is three layers of one size: the picture, the token overlay, then the boxes, so that
// the overlay tints the photo but not the labels, and a threshold change redraws the boxes only.
// layout() sizes the canvases and draws the picture: once per image and when the window resizes.
function layout() {
  const [height, width] = state.answer.image_size;
  // Fit the view's width and most of the window's height; small images are enlarged so that
  // their labels stay readable.
  const room = el.stage.parentElement.clientWidth || width;
  const scale = Math.min(room / width, (0.8 * window.innerHeight) / height);
  const view = {
    width: Math.max(1, Math.round(width * scale)),
    height: Math.max(1, Math.round(height * scale)),
    ratio: window.devicePixelRatio || 1, // sharp lines and text on high-density screens
  };
  state.view = view;
  for (const canvas of [el.picture, el.canvas]) {
    canvas.width = Math.round(view.width * view.ratio);
    canvas.height = Math.round(view.height * view.ratio);
    canvas.style.width = `${view.width}px`;
    canvas.style.height = `${view.height}px`;
  }
  const ctx = el.picture.getContext("2d");
  if (state.picture) {
    ctx.drawImage(state.picture, 0, 0, el.picture.width, el.picture.height);
  } else {
    ctx.fillStyle = "#d9dce1";
    ctx.fillRect(0, 0, el.picture.width, el.picture.height);
  }
}

function drawBoxes(shown) {
  const { width, height, ratio } = state.view;
  const [imageHeight, imageWidth] = state.answer.image_size;
  const sx = width / imageWidth;
  const sy = height / imageHeight;
  const ctx = el.canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "600 13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.lineWidth = 2;
  // The best detections last, so that their boxes and labels lie on top.
  for (const d of [...shown].reverse()) {
    const [x1, y1, x2, y2] = d.box;
    const x = x1 * sx;
    const y = y1 * sy;
    ctx.strokeStyle = ctx.fillStyle = colour(d.label);
    ctx.strokeRect(x, y, (x2 - x1) * sx, (y2 - y1) * sy);
    const text = `${d.name} ${d.score.toFixed(3)}`;
    const w = ctx.measureText(text).width + 8;
    const h = 18;
    // Above the box when it fits, else inside its top; never past the right edge.
    const lx = Math.max(0, Math.min(x - 1, width - w));
    const ly = y - h >= 0 ? y - h : y;
    ctx.fillRect(lx, ly, w, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, lx + 4, ly + 3);
  }
  el.canvas.dataset.drawn = String(shown.length);
}

function list(shown) {
  const items = shown.map((d) => {
    const li = document.createElement("li");
    li.dataset.name = d.name;
    li.dataset.score = String(d.score); // the shortest text that reads back as the same number
    li.dataset.box = JSON.stringify(d.box);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(d.label);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = d.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = d.score.toFixed(3);
    const box = document.createElement("span");
    box.className = "box";
    box.textContent = `[${d.box.map((v) => Math.round(v)).join(", ")}]`;
    li.append(swatch, name, score, box);
    return li;
  });
  el.detections.replaceChildren(...items);
  el.detections.dataset.ready = ""; // shows "none above the threshold" when the list is empty
}

// The kept-token overlay: one /v1/tokens request per image, made when it is first wanted.
async function updateOverlay() {
  if (!el.tokensToggle.checked || !state.answer) {
    el.tokensImage.hidden = true;
    return;
  }
  const seq = state.seq;
  const first = !state.tokens;
  if (first) {
    state.tokens = call("/v1/tokens", postImage(state.file));
    setStatus("busy", `Finding the tokens the encoder kept in ${state.file.name}…`);
  }
  let tokens;
  try {
    tokens = await state.tokens;
  } catch (err) {
    if (seq !== state.seq) return;
    state.tokens = null; // toggling again tries again
    el.tokensToggle.checked = false;
    setStatus("error", `${state.file.name}: ${err.message}`);
    return;
  }
  if (seq !== state.seq) return;
  if (!el.tokensLayer.options.length) {
    const options = tokens.layers.map((layer, i) =>
      new Option(`layer ${layer.layer}: kept ${layer.kept} of ${tokens.valid_tokens} tokens`, String(i)));
    el.tokensLayer.replaceChildren(...options);
    el.tokensLayer.disabled = false;
  }
  if (first) setStatus("done", summary());
  if (!el.tokensToggle.checked) return; // switched off while the request ran
  const layer = tokens.layers[el.tokensLayer.selectedIndex];
  el.tokensImage.src = layer.png;
  el.tokensImage.dataset.layer = String(layer.layer);
  el.tokensImage.hidden = false;
}

// Events.
el.file.addEventListener("change", () => {
  if (el.file.files.length) detect(el.file.files[0]);
  el.file.value = ""; // choosing the same file again still counts as a change
});

el.drop.addEventListener("dragover", (event) => {
  event.preventDefault(); // accept the drop
  el.drop.classList.add("over");
});
el.drop.addEventListener("dragleave", (event) => {
  if (!el.drop.contains(event.relatedTarget)) el.drop.classList.remove("over");
});
el.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  el.drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) detect(file);
});
// A file dropped beside the zone would otherwise make the browser leave the page to open it.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

el.threshold.addEventListener("input", () => {
  state.threshold = Number(el.threshold.value);
  el.thresholdValue.textContent = formatThreshold(state.threshold);
  if (state.answer) render(); // filtering only: no new request
});

el.tokensToggle.addEventListener("change", updateOverlay);
el.tokensLayer.addEventListener("change", updateOverlay);
window.addEventListener("resize", () => {
  if (!state.answer) return;
  layout();
  drawBoxes(shownDetections());
});

loadModel();
