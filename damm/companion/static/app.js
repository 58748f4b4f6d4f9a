// The page itself: wires the loaders, the inspector, the QR code, local copies, install guides,
// diagnostics and the catalog check together. It opens no connection of any kind: every input is
// a file the user hands it (or the preload.js a bundle or `damm device companion` writes).
"use strict";
(function () {
  var Damm = window.Damm;
  var $ = function (id) { return document.getElementById(id); };
  var utf8 = new TextDecoder("utf-8", { fatal: true });
  var state = { name: null, config: null, parsed: null, device: null, catalog: null, diagnostics: null,
    devicePublic: null, catalogResult: null, platform: null };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function showError(message) {
    $("import-error").textContent = message;
    $("import-error").hidden = !message;
  }

  function status(message) { $("import-status").textContent = message; }

  function bytesToB64(bytes) {
    var s = "";
    for (var i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
    return btoa(s);
  }

  async function fingerprint(b64) {
    var raw = Damm.b64bytes(b64);
    if (!raw) return "?";
    var hex = Damm.hex(new Uint8Array(await crypto.subtle.digest("SHA-256", raw))).slice(0, 16);
    return hex.match(/.{4}/g).join(" ");
  }

  // X25519 public key from the private key: WebCrypto clamps the scalar as WireGuard does.
  async function publicFromPrivate(b64) {
    var priv = Damm.b64bytes(b64);
    var prefix = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20];
    var pkcs8 = new Uint8Array(48);
    pkcs8.set(prefix, 0);
    pkcs8.set(priv, 16);
    var key = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "X25519" }, true, ["deriveBits"]);
    var jwk = await crypto.subtle.exportKey("jwk", key);
    var x = jwk.x.replace(/-/g, "+").replace(/_/g, "/");
    return x + "=".repeat((4 - (x.length % 4)) % 4);
  }

  function ipv4ToInt(ip) {
    return ip.split(".").reduce(function (acc, p) { return acc * 256 + Number(p); }, 0);
  }
  function intToIpv4(n) {
    return [24, 16, 8, 0].map(function (s) { return Math.floor(n / Math.pow(2, s)) % 256; }).join(".");
  }

  // The address to ping through the tunnel: a DNS server inside the tunnel network (DAMM's
  // default is the gateway itself), else the network's first host.
  function probeAddress(parsed) {
    var v4 = (parsed.interface.Address || []).map(function (a) { return Damm.cidr(a, true); })
      .find(function (c) { return c && c.version === 4; });
    if (!v4) return "the gateway's tunnel address";
    var prefix = v4.prefix >= 31 ? 24 : v4.prefix;
    var size = Math.pow(2, 32 - prefix);
    var base = Math.floor(ipv4ToInt(v4.ip) / size) * size;
    var inside = (parsed.interface.DNS || []).find(function (d) {
      return /^\d+\.\d+\.\d+\.\d+$/.test(d) && Math.floor(ipv4ToInt(d) / size) * size === base && d !== v4.ip;
    });
    return inside || intToIpv4(base + 1);
  }

  function tunnelMode(allowed) {
    var full4 = allowed.indexOf("0.0.0.0/0") >= 0;
    var full6 = allowed.indexOf("::/0") >= 0;
    if (full4 && full6) return "full tunnel: all IPv4 and IPv6 traffic goes through the gateway";
    if (full4) return "full tunnel for IPv4 (IPv6 traffic does not use the tunnel)";
    if (full6) return "full tunnel for IPv6 (IPv4 traffic does not use the tunnel)";
    return "split tunnel: only traffic to these networks goes through the gateway";
  }

  function expiry(iso) {
    if (!iso) return "no key expiry recorded";
    var t = Date.parse(iso);
    if (isNaN(t)) return "unreadable expiry \u201c" + iso + "\u201d";
    var days = Math.round((t - Date.now()) / 86400000);
    var when = new Date(t).toISOString().replace(".000Z", "Z");
    return t < Date.now() ? "expired at " + when + ": rotate the key (damm device rotate-key)"
      : when + " (in " + days + " day" + (days === 1 ? "" : "s") + ")";
  }

  function field(label, key, value) {
    var dd = el("dd", { "data-field": key });
    (Array.isArray(value) ? value : [value]).forEach(function (v, i) {
      if (i) dd.appendChild(el("br"));
      dd.appendChild(document.createTextNode(v));
    });
    return [el("dt", { text: label }), dd];
  }

  async function renderProfile() {
    var p = state.parsed;
    var dev = state.device;
    var peer = p.peers[0];
    state.devicePublic = await publicFromPrivate(p.interface.PrivateKey);
    var warnings = [];
    if (p.hooks.length) {
      warnings.push("This profile runs shell commands as root when it starts or stops (" + p.hooks.join(", ") + "). A profile from DAMM never does: do not install it unless you wrote those lines.");
    }
    if (p.peers.length > 1) warnings.push("This profile has " + p.peers.length + " peers; only the first is described below.");
    if (dev && dev.public_key && dev.public_key !== state.devicePublic) {
      warnings.push("device.json belongs to another key (" + dev.public_key + ") than this profile's private key: they do not describe the same device.");
    }
    if (!dev) warnings.push("Load device.json to see the device, gateway, pinned catalog key and key expiry.");
    var ul = $("profile-warnings");
    ul.replaceChildren.apply(ul, warnings.map(function (w) { return el("li", { text: w }); }));

    var allowed = peer.AllowedIPs || [];
    var rows = [];
    rows.push(field("Device", "device-id", dev ? dev.device_id : "unknown (no device.json)"));
    rows.push(field("Tunnel address", "address", p.interface.Address || ["none"]));
    rows.push(field("DNS", "dns", p.interface.DNS && p.interface.DNS.length ? p.interface.DNS : ["none set: the system's DNS is used"]));
    rows.push(field("Gateway", "gateway", dev ? dev.gateway_id + " (front door " + dev.front_door_id + ")" : "unknown (no device.json)"));
    rows.push(field("Endpoint", "endpoint", peer.Endpoint || "none: the gateway must contact this device"));
    rows.push(field("Allowed IPs", "allowed-ips", allowed.length ? allowed : ["none"]));
    rows.push(field("Routing", "tunnel-mode", tunnelMode(allowed)));
    rows.push(field("Device public key", "device-key", state.devicePublic));
    rows.push(field("Device key fingerprint", "device-fingerprint", await fingerprint(state.devicePublic)));
    rows.push(field("Gateway public key", "gateway-key", peer.PublicKey));
    rows.push(field("Gateway key fingerprint", "gateway-fingerprint", await fingerprint(peer.PublicKey)));
    var trust = dev && dev.trust;
    rows.push(field("Pinned catalog keys", "catalog-keys", trust ? Object.keys(trust.pinned).sort().map(function (k) {
      return k + " = " + trust.pinned[k];
    }) : "none pinned"));
    rows.push(field("Catalog version", "catalog-version", trust ? "accepts version " + trust.min_version + " or newer" : "unknown"));
    rows.push(field("Catalog region", "catalog-region", trust ? trust.region : "unknown"));
    rows.push(field("Key expiry", "key-expiry", dev ? expiry(dev.key_expires_at) : "unknown (no device.json)"));
    var dl = $("fields");
    dl.replaceChildren();
    rows.forEach(function (pair) { dl.appendChild(pair[0]); dl.appendChild(pair[1]); });

    $("profile-name").textContent = state.name;
    $("private-key").textContent = p.interface.PrivateKey;
    $("private-key").hidden = true;
    $("reveal-key").textContent = "Show private key";
    $("qr-canvas").hidden = true;
    $("show-qr").textContent = "Show QR code";
    ["profile", "qr", "install"].forEach(function (id) { $(id).hidden = false; });
    $("save-copy").disabled = false;
    $("export-support").disabled = false;
    renderGuide();
  }

  function drawQR() {
    var qr = qrcode(0, "M");
    qr.addData(state.config, "Byte");
    qr.make();
    var n = qr.getModuleCount();
    var scale = 4;
    var border = 4;
    var canvas = $("qr-canvas");
    canvas.width = canvas.height = (n + 2 * border) * scale;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#000";
    for (var r = 0; r < n; r++) {
      for (var c = 0; c < n; c++) {
        if (qr.isDark(r, c)) ctx.fillRect((c + border) * scale, (r + border) * scale, scale, scale);
      }
    }
  }

  // Install guides
  function renderGuide() {
    if (!state.parsed) return;
    var ctx = { file: state.name + ".conf", name: state.name, probe: probeAddress(state.parsed) };
    var tabs = $("platform-tabs");
    tabs.replaceChildren();
    Damm.PLATFORMS.forEach(function (p) {
      var b = el("button", { type: "button", role: "tab", "data-platform": p.id, text: p.label,
        "aria-selected": String(p.id === state.platform) });
      b.addEventListener("click", function () { state.platform = p.id; renderGuide(); });
      tabs.appendChild(b);
    });
    var platform = Damm.PLATFORMS.find(function (p) { return p.id === state.platform; });
    var g = platform.guide(ctx);
    var step = function (s) {
      if (typeof s === "string") return el("li", { text: s });
      return el("li", {}, [document.createTextNode(s.text + " "), el("code", { text: s.code })]);
    };
    $("guide").replaceChildren(
      el("h3", { text: platform.label }),
      el("p", { text: g.intro }),
      el("ol", { class: "steps" }, g.steps.map(step)),
      el("h4", { text: "Check that it works" }),
      el("ol", { class: "check" }, g.check.map(step)));
  }

  // Diagnostics
  var ADVICE = {
    files: "Run: chmod 700 STATE_DIR; chmod 600 STATE_DIR/private.key STATE_DIR/device.json STATE_DIR/wg0.conf (or re-enroll if files are missing).",
    state: "device.json is missing or unreadable: enroll again with a new token.",
    config: "wg0.conf is damaged: restore it from a fresh bundle (damm device bundle) or re-enroll.",
    interface: "The tunnel is not up: start it (wg-quick up wg0, or activate it in the WireGuard app).",
    handshake: "The gateway has not answered recently: check the endpoint below, then try damm device failover.",
    endpoint: "The gateway's address does not resolve or is unreachable from here: check the network or firewall, then try damm device failover.",
    catalog: "The signed catalog could not be fetched or was refused: see the reason; an expired catalog usually means the control plane is unreachable.",
  };

  function checkDiagnostics(obj) {
    if (!obj || typeof obj !== "object" || !Array.isArray(obj.checks) || typeof obj.ok !== "boolean") {
      throw new Error("not a diagnostics export: it has no \u201cok\u201d and \u201cchecks\u201d");
    }
    obj.checks.forEach(function (c, i) {
      if (!c || typeof c.name !== "string" || ["pass", "fail", "skip"].indexOf(c.status) < 0 || typeof c.reason !== "string") {
        throw new Error("check " + (i + 1) + " is not {name, status: pass|fail|skip, reason}");
      }
    });
    return obj;
  }

  function renderDiagnostics() {
    var d = state.diagnostics;
    var ul = $("checks");
    ul.replaceChildren();
    if (!d) { $("diagnostics-summary").textContent = ""; return; }
    var when = typeof d.generated_at === "number" ? new Date(d.generated_at * 1000).toISOString().replace(".000Z", "Z") : "an unknown time";
    var failed = d.checks.filter(function (c) { return c.status === "fail"; }).length;
    $("diagnostics-summary").textContent = (d.ok ? "All checks passed" : failed + " check" + (failed === 1 ? "" : "s") + " failed") +
      " (run at " + when + (d.device ? " on device " + d.device.device_id : "") + ").";
    d.checks.forEach(function (c) {
      var li = el("li", { class: "check-" + c.status, "data-check": c.name }, [
        el("strong", { text: c.status.toUpperCase() + " " }), el("span", { text: c.name + ": " + c.reason })]);
      if (c.status === "fail" && ADVICE[c.name]) li.appendChild(el("p", { class: "advice", text: "What to do: " + ADVICE[c.name] }));
      ul.appendChild(li);
    });
    $("export-support").disabled = false;
  }

  function download(name, text, type) {
    var url = URL.createObjectURL(new Blob([text], { type: type }));
    var a = el("a", { href: url, download: name });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  }

  // Only named public fields go in, so the private key cannot reach the file by accident.
  function supportFile() {
    var p = state.parsed;
    var dev = state.device;
    var out = { kind: "damm-support", written_at: new Date().toISOString(), note: "Written by the DAMM companion page; it holds no private key." };
    if (p) {
      var peer = p.peers[0];
      out.profile = { name: state.name, device_public_key: state.devicePublic, address: p.interface.Address || [],
        dns: p.interface.DNS || [], gateway_public_key: peer.PublicKey, endpoint: peer.Endpoint || null,
        allowed_ips: peer.AllowedIPs || [], hooks: p.hooks };
    }
    if (dev) {
      out.device = {};
      ["device_id", "public_key", "gateway_id", "gateway_public_key", "front_door_id", "endpoint", "address",
        "address6", "allowed_ips", "dns", "key_expires_at", "trust"].forEach(function (k) {
        if (k in dev) out.device[k] = dev[k];
      });
    }
    if (state.diagnostics) {
      var d = state.diagnostics;
      out.diagnostics = { generated_at: d.generated_at, ok: d.ok, device: d.device || null,
        checks: d.checks.map(function (c) { return { name: c.name, status: c.status, reason: c.reason }; }) };
    }
    if (state.catalogResult) {
      var r = state.catalogResult;
      out.catalog = r.ok ? { verdict: "verified", version: String(r.catalog.version), key_id: r.keyId, region: r.catalog.region }
        : { verdict: "refused", code: r.code, detail: r.detail };
    }
    var text = JSON.stringify(out, null, 2) + "\n";
    if (p && (text.indexOf(p.interface.PrivateKey) >= 0 || text.indexOf(p.interface.PrivateKey.replace(/=+$/, "")) >= 0)) {
      throw new Error("refusing to export: the private key would be in the file");
    }
    return text;
  }

  // Catalog
  var CATALOG_ADVICE = {
    malformed_request: "The file is damaged or is not a DAMM catalog; failover would refuse it too.",
    catalog_bad_signature: "The catalog was changed after it was signed, or signed by someone else: do not trust anything in it.",
    catalog_unknown_key: "The catalog is signed by a key this device never pinned: it may be forged, or the device missed a key rotation (re-enroll).",
    catalog_stale: "The catalog is past its expiry (or dated in the future): check the device clock, then fetch a fresh one with damm device failover or diagnose.",
    catalog_rollback: "The catalog is older than one this device already accepted: someone may be replaying an old catalog.",
    catalog_wrong_region: "The catalog is for another region than the device's: it lists gateways this device was never placed on.",
    state_missing: "Load the device's device.json with the catalog: it holds the pinned key to check against.",
  };
  async function renderCatalog() {
    var verdict = $("catalog-verdict");
    var doors = $("catalog-doors");
    doors.replaceChildren();
    verdict.className = "";
    if (!state.catalog) {
      state.catalogResult = null;
      verdict.textContent = state.device ? "This device holds no signed catalog yet (it keeps one after its first failover). Load catalog.signed to check one." : "";
      return;
    }
    var r = await Damm.verifyCatalog(state.catalog, state.device && state.device.trust, Math.floor(Date.now() / 1000));
    state.catalogResult = r;
    if (!r.ok) {
      verdict.className = "refused";
      verdict.textContent = "Refused: " + r.code + ": " + r.message + ": " + r.detail;
      if (CATALOG_ADVICE[r.code]) doors.appendChild(el("li", { class: "advice", text: CATALOG_ADVICE[r.code] }));
      return;
    }
    var c = r.catalog;
    var expires = new Date(Number(c.expires_at) * 1000).toISOString().replace(".000Z", "Z");
    verdict.className = "verified";
    verdict.textContent = "Verified: version " + c.version + " for region " + c.region + ", signed by pinned key " + r.keyId +
      ", valid until " + expires + ", " + c.gateways.length + " gateway" + (c.gateways.length === 1 ? "" : "s") + ".";
    var gw = state.device && c.gateways.find(function (g) { return g.id === state.device.gateway_id; });
    if (state.device && !gw) {
      doors.appendChild(el("li", { text: "This device's gateway " + state.device.gateway_id + " is not in the catalog: failover cannot help it." }));
    }
    if (gw) {
      gw.front_doors.forEach(function (fd) {
        var current = fd.endpoint === state.device.endpoint ? " (current)" : "";
        doors.appendChild(el("li", { text: "front door " + fd.id + ": " + fd.endpoint + " " + fd.transport + ", priority " + fd.priority + current }));
      });
    }
  }

  // Loading files
  function nameOf(file) { return file.replace(/^.*[\\/]/, "").replace(/\.conf$/i, "") || "profile"; }

  function classify(name, bytes) {
    var text = null;
    try { text = utf8.decode(bytes); } catch (e) { text = null; }
    var first = bytes.length ? bytes[0] : 0;
    var looksPacked = (first >= 0x80 && first <= 0x8f) || first === 0xde || first === 0xdf;
    if (/\.(signed|msgpack|bin)$/i.test(name) || looksPacked) return { kind: "catalog", bytes: bytes };
    if (text === null) {
      throw new Error(name + " is none of: a WireGuard profile, device.json, a diagnostics export, a signed catalog");
    }
    if (/^\s*\{/.test(text)) {
      var obj;
      try { obj = JSON.parse(text); } catch (e) { throw new Error(name + " is not valid JSON: " + e.message); }
      if (obj && Array.isArray(obj.checks)) return { kind: "diagnostics", value: checkDiagnostics(obj) };
      if (obj && typeof obj.device_id === "string" && typeof obj.gateway_public_key === "string") return { kind: "device", value: obj };
      throw new Error(name + " is JSON but neither device.json nor a diagnostics export");
    }
    return { kind: "config", text: text, name: nameOf(name) };
  }

  async function load(items) {
    var cfg = items.find(function (i) { return i.kind === "config"; });
    if (cfg) {
      var parsed = Damm.parseConfig(cfg.text);
      state.config = cfg.text;
      state.parsed = parsed;
      state.name = cfg.name;
      state.device = null; // a new profile starts clean: nothing of the last one carries over
      state.catalog = null;
      state.diagnostics = null;
    }
    items.forEach(function (i) {
      if (i.kind === "device") state.device = i.value;
      if (i.kind === "catalog") state.catalog = i.bytes;
      if (i.kind === "diagnostics") state.diagnostics = i.value;
    });
    if (state.parsed) await renderProfile();
    renderDiagnostics();
    await renderCatalog();
  }

  async function loadFiles(fileList) {
    showError("");
    var items = [];
    try {
      for (var f of Array.from(fileList)) {
        var bytes = new Uint8Array(await f.arrayBuffer());
        items.push(Object.assign(classify(f.name, bytes), { file: f.name }));
      }
      await load(items);
      status("Loaded " + items.map(function (i) { return i.file; }).join(", ") + ".");
    } catch (e) {
      var file = items.length < fileList.length ? fileList[items.length].name : (items.find(function (i) { return i.kind === "config"; }) || {}).file;
      showError((e instanceof Damm.ParseError && file ? file + ", " : "") + e.message);
    }
  }

  // Local copies
  async function renderCopies() {
    var rows = await Damm.store.list();
    var ul = $("copy-list");
    ul.replaceChildren();
    $("copies-empty").hidden = rows.length > 0;
    rows.forEach(function (row) {
      var input = el("input", { type: "text", value: row.name, "aria-label": "Name of " + row.name });
      var rename = el("button", { type: "button", text: "Rename" });
      var open = el("button", { type: "button", text: "Open" });
      var exp = el("button", { type: "button", text: "Export" });
      var del = el("button", { type: "button", text: "Delete" });
      rename.addEventListener("click", async function () {
        var name = input.value.trim();
        if (!/^[A-Za-z0-9_=+.-]{1,64}$/.test(name)) { showError("A name may use letters, digits and _=+.- (at most 64)."); return; }
        row.name = name;
        await Damm.store.put(row);
        await renderCopies();
      });
      open.addEventListener("click", async function () {
        showError("");
        await load([{ kind: "config", text: row.config, name: row.name }].concat(
          row.device ? [{ kind: "device", value: row.device }] : [],
          row.catalog ? [{ kind: "catalog", bytes: Damm.b64bytes(row.catalog) }] : [],
          row.diagnostics ? [{ kind: "diagnostics", value: row.diagnostics }] : []));
        status("Opened the copy \u201c" + row.name + "\u201d.");
      });
      exp.addEventListener("click", function () { download(row.name + ".conf", row.config, "text/plain"); });
      del.addEventListener("click", async function () { await Damm.store.remove(row.id); await renderCopies(); });
      ul.appendChild(el("li", { "data-copy": row.name }, [input, rename, open, exp, del,
        el("small", { text: "kept " + row.savedAt })]));
    });
  }

  async function saveCopy() {
    if (!state.parsed) return;
    await Damm.store.put({ id: crypto.randomUUID(), name: state.name, savedAt: new Date().toISOString(),
      config: state.config, device: state.device, catalog: state.catalog ? bytesToB64(state.catalog) : null,
      diagnostics: state.diagnostics });
    await renderCopies();
    status("Kept a copy of \u201c" + state.name + "\u201d in this browser.");
  }

  function wire() {
    $("file-input").addEventListener("change", function (e) { loadFiles(e.target.files); e.target.value = ""; });
    $("diagnostics-input").addEventListener("change", function (e) { loadFiles(e.target.files); e.target.value = ""; });
    $("catalog-input").addEventListener("change", async function (e) {
      var f = e.target.files[0];
      e.target.value = "";
      if (!f) return;
      state.catalog = new Uint8Array(await f.arrayBuffer());
      await renderCatalog();
    });
    var zone = $("dropzone");
    zone.addEventListener("dragover", function (e) { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
    zone.addEventListener("drop", function (e) { e.preventDefault(); zone.classList.remove("over"); loadFiles(e.dataTransfer.files); });
    $("reveal-key").addEventListener("click", function () {
      var key = $("private-key");
      key.hidden = !key.hidden;
      this.textContent = key.hidden ? "Show private key" : "Hide private key";
    });
    $("show-qr").addEventListener("click", function () {
      var canvas = $("qr-canvas");
      if (canvas.hidden) drawQR();
      canvas.hidden = !canvas.hidden;
      this.textContent = canvas.hidden ? "Show QR code" : "Hide QR code";
    });
    $("save-copy").addEventListener("click", saveCopy);
    $("download-profile").addEventListener("click", function () {
      download(state.name + ".conf", state.config, "text/plain");
    });
    $("export-support").addEventListener("click", function () {
      try {
        download("damm-support" + (state.device ? "-" + state.device.device_id : "") + ".json", supportFile(), "application/json");
      } catch (e) {
        showError(e.message);
      }
    });
  }

  async function start() {
    state.platform = Damm.detectPlatform(navigator);
    wire();
    await renderCopies();
    var pre = window.DAMM_PRELOAD;
    if (pre && pre.config) {
      try {
        await load([{ kind: "config", text: pre.config, name: pre.name || "profile" }].concat(
          pre.device ? [{ kind: "device", value: pre.device }] : [],
          pre.catalog ? [{ kind: "catalog", bytes: Damm.b64bytes(pre.catalog) }] : [],
          pre.diagnostics ? [{ kind: "diagnostics", value: checkDiagnostics(pre.diagnostics) }] : []));
        status("Showing " + (pre.source || "the profile this page was prepared with") + ".");
      } catch (e) {
        showError("The preloaded profile is unusable: " + e.message);
      }
    }
    document.body.setAttribute("data-ready", "true");
  }

  start();
})();
