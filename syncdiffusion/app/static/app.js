// The page: a form drawn from the library's description of the inputs (/api/models), a run
// followed step by step (/api/jobs/ID/events), the result, its 360-degree view and this tab's
// history. Every number travels as text: a seed can exceed what JavaScript's numbers hold. With
// a ControlNet picked, the condition image travels in the same JSON, as base64.
"use strict";

const $ = (id) => document.getElementById(id);
let described = null; // /api/models
let current = null; // the form shown: {name, inputs}, the model's inputs with or without control
let job = null; // {id, events}
let viewer = null;

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function fieldFor(spec) {
  const id = "in-" + spec.name;
  let control;
  if (spec.kind === "bool") {
    control = el("input", { type: "checkbox", id, checked: spec.default === true });
  } else if (spec.kind === "choice") {
    control = el("select", { id }, spec.choices.map((c) => el("option", { value: c, textContent: c })));
    control.value = spec.default;
  } else if (spec.kind === "image") {
    control = el("input", { type: "file", id, accept: "image/png,image/jpeg,image/webp" });
    control.onchange = () => ($("note-" + spec.name).textContent = "");
  } else if (spec.picker === "lora") {
    // A hub repository, an https URL, or one of the LoRAs of the weights folder's lora/.
    control = el("input", { type: "text", id, value: spec.default ?? "", autocomplete: "off" });
    control.setAttribute("list", "lora-choices");
  } else if (spec.kind === "str") {
    control = el("textarea", { id, rows: spec.required ? 3 : 2, value: spec.default ?? "" });
  } else {
    control = el("input", { type: "number", id, value: spec.default ?? "" });
    if (spec.ge !== undefined) control.min = spec.ge;
    if (spec.le !== undefined) control.max = spec.le;
    control.step = spec.kind === "float" ? "any" : spec.multiple_of ?? "1";
  }
  control.name = spec.name;
  const label = el("label", { className: "name", htmlFor: id, textContent: spec.name });
  const parts = [label, control];
  if (spec.name === "seed") {
    const random = el("input", { type: "checkbox", id: "seed-random" });
    parts.splice(1, 1, el("div", { className: "seed-row" }, [
      control, el("label", {}, [random, " random"]),
    ]));
  }
  const allowed = spec.kind === "image"
    ? `a PNG, JPEG or WebP file of at most ${described.max_upload / 2 ** 20} MiB` : spec.allowed;
  const help = el("small", { textContent: `${spec.help} (${allowed})` });
  const error = el("p", { className: "error", id: "error-" + spec.name, role: "alert" });
  if (spec.kind === "image") parts.push(el("p", { className: "note", id: "note-" + spec.name }));
  const className = "field" + (spec.kind === "bool" ? " bool" : "");
  return el("div", { className, id: "field-" + spec.name }, [...parts, help, error]);
}

function valueOf(name) {
  const control = $("in-" + name);
  return control.type === "checkbox" ? control.checked : control.value;
}

function setValue(name, value) {
  const control = $("in-" + name);
  if (!control) return;
  if (control.type === "checkbox") control.checked = value === true;
  else control.value = value;
}

// The form of the picked model, with the control inputs where a ControlNet is picked.
function drawForm() {
  const old = current;
  const model = described.models.find((m) => m.name === $("model").value);
  const inputs = $("controlnet").value ? model.control_inputs : model.inputs;
  const kept = {};
  for (const spec of old ? old.inputs : []) {
    // What the person typed stays, where the field's default is the same in the new form: a
    // side typed for one model's windows, or instead of the condition image's size, does not.
    const same = inputs.find((s) => s.name === spec.name)?.default === spec.default;
    if (spec.kind === "image" || !same) continue; // nor can a file input be filled again
    const value = valueOf(spec.name);
    if (value !== spec.default) kept[spec.name] = value;
  }
  current = { name: model.name, inputs };
  $("inputs").replaceChildren(...current.inputs.map(fieldFor));
  for (const [name, value] of Object.entries(kept)) setValue(name, value);
}

function clearErrors() {
  document.querySelectorAll(".field.bad").forEach((f) => f.classList.remove("bad"));
  document.querySelectorAll(".error").forEach((e) => (e.textContent = ""));
}

function showErrors(answer) {
  $("form-error").textContent = answer.error;
  for (const [name, message] of Object.entries(answer.fields || {})) {
    const error = $("error-" + name);
    if (!error) continue;
    error.textContent = message;
    $("field-" + name).classList.add("bad");
  }
}

function busy(running) {
  $("run").disabled = running;
  $("cancel").disabled = !running;
}

async function run(event) {
  event.preventDefault();
  clearErrors();
  const inputs = {};
  for (const spec of [...current.inputs, ...described.output]) {
    if (spec.kind !== "image") inputs[spec.name] = valueOf(spec.name);
  }
  // Each image field's file (the condition image, an image to start from, its mask) as base64.
  for (const spec of current.inputs.filter((s) => s.kind === "image")) {
    const file = $("in-" + spec.name).files[0];
    if (file && file.size > described.max_upload) {
      const problem = `${spec.name} must be a PNG, JPEG or WebP file of at most `
        + `${described.max_upload / 2 ** 20} MiB; got '${file.name}' of `
        + `${Math.round(file.size / 2 ** 20)} MiB`;
      return showErrors({ error: problem, fields: { [spec.name]: problem } });
    }
    if (file) inputs[spec.name] = { name: file.name, data: await base64(file) };
  }
  const body = {
    model: $("model").value,
    controlnet: $("controlnet").value || null,
    inputs,
    random_seed: $("seed-random").checked,
  };
  const answer = await post("/api/jobs", body);
  if (answer.error) return showErrors(answer);
  busy(true);
  $("status").textContent = "Sent.";
  job = { id: answer.job, events: new EventSource(`/api/jobs/${answer.job}/events`) };
  job.events.onmessage = (message) => follow(JSON.parse(message.data));
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file); // data:TYPE;base64,DATA
  });
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.json();
}

function drawSteps(steps, synced) {
  const sync = new Set(synced);
  $("progress").replaceChildren(...Array.from({ length: steps }, (_, i) =>
    el("div", { className: "step" + (sync.has(i) ? " sync" : ""), title: `step ${i + 1}` })));
}

function follow(event) {
  const status = $("status");
  if (event.state === "queued") {
    status.textContent = event.ahead ? `In line: ${event.ahead} job(s) before yours.` : "Next in line.";
  } else if (event.state === "loading") {
    const controlnet = event.controlnet ? ` with ${event.controlnet}` : "";
    status.textContent = `Loading ${event.model}${controlnet}…`;
  } else if (event.state === "running") {
    drawSteps(event.steps, event.synced);
    status.textContent = `Step 0/${event.steps}`;
  } else if (event.state === "step") {
    const steps = $("progress").children;
    for (let i = 0; i < event.step; i++) steps[i].classList.add("done");
    const eta = event.step < event.steps ? ` · about ${Math.ceil(event.eta)} s left` : "";
    status.textContent = `Step ${event.step}/${event.steps}${eta}${event.sync ? " · synced" : ""}`;
  } else {
    job.events.close();
    job = null;
    busy(false);
    if (event.state === "done") show(event);
    else if (event.state === "error") {
      status.textContent = "Failed.";
      $("form-error").textContent = event.message;
    } else status.textContent = "Cancelled.";
  }
}

async function show(result) {
  $("status").textContent = `Done in ${result.seconds} s.`;
  $("result").hidden = false;
  $("result-text").textContent = `${result.width}x${result.height}, seed ${result.seed}`;
  $("picture").src = result.file;
  $("picture").dataset.width = result.width;
  $("picture").dataset.height = result.height;
  $("download").href = result.file;
  $("download").download = result.name;
  if (viewer) viewer.destroy();
  viewer = null;
  $("viewer").hidden = !result.loop_closure;
  if (result.loop_closure) {
    // Pannellum reads the file's own Photo Sphere XMP: the band of the sphere it covers.
    viewer = pannellum.viewer("viewer", { type: "equirectangular", panorama: result.file,
      autoLoad: true });
  }
  const token = result.file.split("/").pop();
  remember(result, await (await fetch(`/api/parameters/${token}`)).json());
}

// A run in the history: its inputs, and a button that puts them back in the form. An image
// cannot be put back (a page may not fill a file input): the file keeps only its record.
function remember(result, saved) {
  const shown = { ...saved.fields };
  const record = (image) => `${image.width}x${image.height}, SHA-256 ${image.sha256.slice(0, 12)}…`;
  let layout = null;
  if (saved.controlnet) {
    layout = record(saved.control_image);
    Object.assign(shown, { controlnet: saved.controlnet, control_image: layout });
  }
  const images = Object.fromEntries(Object.entries(saved.images || {})
    .filter(([, image]) => image).map(([name, image]) => [name, record(image)]));
  Object.assign(shown, images);
  const rows = Object.entries(shown).flatMap(([name, value]) =>
    [el("dt", { textContent: name }), el("dd", { textContent: String(value) })]);
  const use = el("button", { type: "button", className: "use", textContent: "Use these settings" });
  use.onclick = () => {
    clearErrors();
    const known = described.controlnets.includes(saved.controlnet);
    $("controlnet").value = known ? saved.controlnet : "";
    drawForm();
    for (const [name, value] of Object.entries(saved.fields)) setValue(name, value);
    $("seed-random").checked = false;
    for (const [name, text] of Object.entries(images)) {
      $("note-" + name).textContent = `Upload the ${name} again: that run's was ${text}.`;
    }
    if (layout && known) {
      $("note-control_image").textContent =
        `Upload the condition image again: that run's was ${layout}.`;
    } else if (layout) {
      $("error-controlnet").textContent = `ControlNet ${saved.controlnet} is not in controlnet/ any more.`;
    }
  };
  const picture = el("a", { href: result.file, download: result.name }, [
    el("img", { src: result.file, alt: result.name }),
  ]);
  $("history").prepend(el("li", {}, [picture, el("dl", {}, rows), use]));
}

async function start() {
  described = await (await fetch("/api/models")).json();
  document.body.append(el("datalist", { id: "lora-choices" },
    described.loras.map((name) => el("option", { value: name }))));
  const select = $("model");
  // A folder still downloading (or broken) is shown, but cannot be picked.
  select.replaceChildren(...described.models.map((m) =>
    el("option", { value: m.name, textContent: m.name })),
  ...described.incomplete.map((m) =>
    el("option", { value: "", disabled: true, title: m.problem,
      textContent: `${m.name} (incomplete)` })));
  if (!described.models.length) {
    $("form-error").textContent = "No complete model in the weights folder: "
      + described.incomplete.map((m) => m.problem).join("; ");
    return;
  }
  select.value = described.default_model;
  select.onchange = drawForm;
  $("controlnet").append(...described.controlnets.map((name) =>
    el("option", { value: name, textContent: name })));
  $("controlnet").onchange = drawForm;
  drawForm();
  $("output").replaceChildren(...described.output.map(fieldFor));
  $("form").onsubmit = run;
  $("cancel").onclick = () => job && post(`/api/jobs/${job.id}/cancel`, {});
  document.body.dataset.ready = "true";
}

start();
