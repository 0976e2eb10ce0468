// The study page: four media played in sync, one row of Left/Same/Right buttons per question, answers saved on
// each click. The server is the source of truth: a button shows as chosen only once the server has stored it.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const base = location.pathname.replace(/\/+$/, ""); // /r/<token>
  const el = { left: $("left"), right: $("right"), driving: $("driving") };
  const master = el.left; // the other videos follow its clock
  const videos = [el.left, el.right, el.driving];
  const CHOICES = [
    ["left", "\u25C0 left better", "A"],
    ["same", "about the same", "S"],
    ["right", "right better \u25B6", "D"],
  ];
  const S = { cases: [], current: -1, metric: 0, frame: 0, playing: false, pending: 0, load: 0 };
  let queue = Promise.resolve(); // answers are sent one after another, in the order given

  const kase = () => S.cases[S.current];
  const isComplete = (c) => c.columns.every((col) => c.answers[col.name]);
  const firstOpen = (c) => Math.max(0, c.columns.findIndex((col) => !c.answers[col.name]));

  function fail(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function setStatus(text, bad = false) {
    const status = $("save-status");
    status.textContent = text;
    status.classList.toggle("bad", bad);
  }

  async function request(path, options) {
    const response = await fetch(base + path, options);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    return body;
  }

  // ------------------------------------------------------------------ progress and questions

  function renderProgress() {
    const total = S.cases.length;
    const done = S.cases.filter(isComplete).length;
    $("progress").max = total;
    $("progress").value = done;
    const text = $("progress-text");
    text.textContent = `case ${S.current + 1} of ${total} \u00B7 ${done} of ${total} complete`;
    text.dataset.complete = String(done);
    text.dataset.total = String(total);
    $("done").hidden = done < total;
    $("case-label").textContent = `case ${S.current + 1} / ${total}`;
    $("prev").disabled = S.current <= 0;
    $("next").disabled = S.current >= total - 1;
  }

  function renderQuestions() {
    const c = kase();
    const table = $("metrics");
    table.replaceChildren();
    c.columns.forEach((col, i) => {
      const row = table.insertRow();
      row.dataset.metric = col.name;
      row.classList.toggle("active", i === S.metric);
      const head = document.createElement("th");
      head.scope = "row";
      const name = document.createElement("span");
      name.className = "metric-name";
      name.textContent = `${i + 1}. ${col.name}`;
      const help = document.createElement("small");
      help.textContent = col.help;
      head.append(name, help);
      row.append(head);
      const cell = row.insertCell();
      for (const [value, label, key] of CHOICES) {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.answer = value;
        button.setAttribute("aria-pressed", String(c.answers[col.name] === value));
        const shortcut = document.createElement("kbd");
        shortcut.textContent = key;
        button.append(`${label} `, shortcut);
        button.addEventListener("click", () => {
          setActive(i);
          give(col.name, value);
        });
        cell.append(button);
      }
    });
  }

  function setActive(i) {
    const c = kase();
    S.metric = Math.max(0, Math.min(c.columns.length - 1, i));
    [...$("metrics").rows].forEach((row, j) => row.classList.toggle("active", j === S.metric));
  }

  function give(metric, value) {
    const position = kase().position;
    S.pending += 1;
    document.body.dataset.pending = String(S.pending);
    setStatus("saving\u2026");
    queue = queue.then(async () => {
      try {
        const saved = await request("/api/answer", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ position, metric, answer: value }),
        });
        const c = S.cases[position];
        c.answers[metric] = value;
        setStatus(`saved ${new Date(saved.time).toLocaleTimeString()}`);
        if (S.current === position) {
          renderQuestions();
          const open = c.columns.findIndex((col, j) => j > S.metric && !c.answers[col.name]);
          setActive(open >= 0 ? open : S.metric);
        }
        renderProgress();
      } catch (e) {
        setStatus(`not saved: ${e.message}`, true);
      } finally {
        S.pending -= 1;
        document.body.dataset.pending = String(S.pending);
      }
    });
  }

  // ------------------------------------------------------------------ synchronised playback

  const clampFrame = (f) => Math.max(0, Math.min(kase().frames - 1, f));
  const timeOf = (f) => (f + 0.5) / kase().fps; // the middle of frame f: no rounding doubt at frame edges
  const frameOf = (t) => clampFrame(Math.floor(t * kase().fps + 1e-6));

  function showFrame(f) {
    S.frame = f;
    $("seek").value = String(f);
    const label = $("frame-label");
    label.textContent = `frame ${f + 1} / ${kase().frames}`;
    label.dataset.frame = String(f);
  }

  function seekFrame(f) {
    stop();
    f = clampFrame(f);
    for (const v of videos) v.currentTime = timeOf(f);
    showFrame(f);
  }

  function setPlaying(playing) {
    S.playing = playing;
    $("play").textContent = playing ? "\u275A\u275A pause" : "\u25B6 play";
    $("play").setAttribute("aria-pressed", String(playing));
    $("study").dataset.playing = String(playing);
  }

  function playAll() {
    Promise.all(videos.map((v) => v.play())).catch((e) => {
      if (S.playing) {
        stop();
        fail(`the videos cannot play: ${e.message}`);
      }
    });
  }

  function play() {
    if (S.playing || $("study").dataset.ready !== "true") return;
    if (S.frame >= kase().frames - 1) seekFrame(0);
    const t = master.currentTime;
    for (const v of videos) if (v !== master) v.currentTime = t;
    setPlaying(true);
    playAll();
    requestAnimationFrame(tick);
  }

  function stop() {
    if (!S.playing) return;
    setPlaying(false);
    for (const v of videos) v.pause();
  }

  function pause() {
    if (!S.playing) return;
    stop();
    seekFrame(frameOf(master.currentTime)); // every video on the same frame
  }

  function tick() {
    if (!S.playing) return;
    const t = master.currentTime;
    const tolerance = 1.5 / kase().fps;
    for (const v of videos) {
      if (v !== master && !v.seeking && Math.abs(v.currentTime - t) > tolerance) v.currentTime = t;
    }
    showFrame(frameOf(t));
    requestAnimationFrame(tick);
  }

  master.addEventListener("ended", () => {
    if (!S.playing) return;
    if ($("loop").checked) {
      for (const v of videos) v.currentTime = timeOf(0);
      playAll();
    } else {
      seekFrame(kase().frames - 1);
    }
  });

  // ------------------------------------------------------------------ cases

  function loaded(video) {
    return new Promise((resolve, reject) => {
      const ok = () => {
        video.removeEventListener("error", bad);
        resolve();
      };
      const bad = () => {
        video.removeEventListener("loadeddata", ok);
        reject(new Error(`the ${video.id} video could not be loaded`));
      };
      video.addEventListener("loadeddata", ok, { once: true });
      video.addEventListener("error", bad, { once: true });
    });
  }

  function showCase(index) {
    if (index < 0 || index >= S.cases.length) return;
    stop();
    S.current = index;
    const c = kase();
    const load = ++S.load;
    $("study").dataset.ready = "false";
    $("case-note").textContent = `This case: ${c.kind_note}.`;
    $("seek").max = String(c.frames - 1);
    const image = $("reference");
    image.src = c.media.reference;
    const loads = [image.decode().catch(() => Promise.reject(new Error("the reference image could not be loaded")))];
    for (const [role, v] of Object.entries(el)) {
      loads.push(loaded(v));
      v.src = c.media[role];
    }
    S.metric = firstOpen(c);
    renderQuestions();
    renderProgress();
    showFrame(0);
    history.replaceState(null, "", `#case=${index + 1}`);
    Promise.all(loads).then(
      () => {
        if (load !== S.load) return;
        seekFrame(0);
        $("study").dataset.ready = "true";
      },
      (e) => fail(`Case ${index + 1}: ${e.message}. Reload the page; if it persists, tell the study's organiser.`),
    );
  }

  // ------------------------------------------------------------------ controls

  $("play").addEventListener("click", () => (S.playing ? pause() : play()));
  $("first").addEventListener("click", () => seekFrame(0));
  $("step-back").addEventListener("click", () => seekFrame(S.frame - 1));
  $("step-forward").addEventListener("click", () => seekFrame(S.frame + 1));
  $("seek").addEventListener("input", () => seekFrame(Number($("seek").value)));
  $("prev").addEventListener("click", () => showCase(S.current - 1));
  $("next").addEventListener("click", () => showCase(S.current + 1));

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || !kase()) return;
    const k = e.key;
    // Enter on a focused control does what the control does (Space stays play/pause everywhere).
    if (k === "Enter" && e.target.closest && e.target.closest("button, summary, a, input")) return;
    let handled = true;
    switch (k) {
      case " ":
        S.playing ? pause() : play();
        break;
      case ",":
      case "ArrowLeft":
        seekFrame(S.frame - 1);
        break;
      case ".":
      case "ArrowRight":
        seekFrame(S.frame + 1);
        break;
      case "Home":
        seekFrame(0);
        break;
      case "l":
      case "L":
        $("loop").checked = !$("loop").checked;
        break;
      case "ArrowUp":
        setActive(S.metric - 1);
        break;
      case "ArrowDown":
        setActive(S.metric + 1);
        break;
      case "a":
      case "A":
        give(kase().columns[S.metric].name, "left");
        break;
      case "s":
      case "S":
        give(kase().columns[S.metric].name, "same");
        break;
      case "d":
      case "D":
        give(kase().columns[S.metric].name, "right");
        break;
      case "n":
      case "N":
      case "Enter":
        showCase(S.current + 1);
        break;
      case "p":
      case "P":
        showCase(S.current - 1);
        break;
      default:
        if (/^[1-9]$/.test(k) && Number(k) <= kase().columns.length) setActive(Number(k) - 1);
        else handled = false;
    }
    if (handled) e.preventDefault();
  });
  // Space activates a focused button on key-up: the key-down above already acted on it.
  document.addEventListener("keyup", (e) => {
    if (e.key === " ") e.preventDefault();
  });

  async function init() {
    document.body.dataset.pending = "0";
    try {
      const state = await request("/api/study");
      S.cases = state.cases;
      $("rater").textContent = `rater: ${state.rater}`;
      $("study").hidden = false;
      const asked = Number((location.hash.match(/case=(\d+)/) || [])[1]);
      let start = asked >= 1 && asked <= S.cases.length ? asked - 1 : S.cases.findIndex((c) => !isComplete(c));
      if (start < 0) start = 0;
      showCase(start);
    } catch (e) {
      fail(`The study could not be loaded: ${e.message}`);
    }
  }

  init();
})();
