// The device's catalog check (damm/catalog/verify.py `verify`, as damm/device/failover.py
// `verify_for_device` calls it), step for step and in the same order: decode the envelope; find
// the pinned key; Ed25519 over "damm.catalog.v1\0" || SHA-512(payload) (WebCrypto); only then
// decode the payload strictly; region; freshness with 60 s of clock skew; version. Each refusal
// carries the code damm/errors.py gives it, so the page and the CLI say the same thing.
"use strict";
var Damm = window.Damm || (window.Damm = {});

(function () {
  var CONTEXT = new TextEncoder().encode("damm.catalog.v1\u0000");
  var SKEW = 60n;
  var MESSAGES = {
    malformed_request: "the request could not be decoded",
    catalog_stale: "the catalog has expired",
    catalog_bad_signature: "the catalog signature does not verify",
    catalog_unknown_key: "the catalog is signed by an unknown key",
    catalog_rollback: "the catalog is older than one already accepted",
    catalog_wrong_region: "the catalog is for another region",
    state_missing: "the device state directory is missing or incomplete",
  };
  // Python's re.search with "$" also matches before one final newline; msgspec uses it.
  var KEY_ID = /^[0-9a-f]{16}\n?$/;
  var KEY32 = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;
  var B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

  function Refusal(code, detail) {
    this.code = code;
    this.detail = detail;
  }

  function quote(s) { return "'" + s.replace(/\\/g, "\\\\").replace(/'/g, "\\'") + "'"; } // like Python's repr

  function malformed(detail) {
    return new Refusal("malformed_request", detail);
  }

  function codePoints(s) {
    var n = 0;
    for (var _ of s) n++; // eslint-disable-line no-unused-vars
    return n;
  }

  // Schema types, each a function(node, path) -> JS value, throwing Refusal like msgspec would.
  function str(min, max, pattern) {
    return function (node, path) {
      if (node.t !== "str") throw malformed("expected str, got " + node.t + " at " + path);
      var n = codePoints(node.v);
      if ((min !== null && n < min) || (max !== null && n > max)) {
        throw malformed("str of wrong length at " + path);
      }
      if (pattern && !pattern.test(node.v)) throw malformed("str does not match at " + path);
      return node.v;
    };
  }
  function int(min, max) {
    return function (node, path) {
      if (node.t !== "int") throw malformed("expected int, got " + node.t + " at " + path);
      if ((min !== null && node.v < min) || (max !== null && node.v > max)) {
        throw malformed("int out of range at " + path);
      }
      return node.v;
    };
  }
  function bin(min, max) {
    return function (node, path) {
      if (node.t !== "bin") throw malformed("expected bytes, got " + node.t + " at " + path);
      if ((min !== null && node.v.length < min) || (max !== null && node.v.length > max)) {
        throw malformed("bytes of wrong length at " + path);
      }
      return node.v;
    };
  }
  function tuple(item) {
    return function (node, path) {
      if (node.t !== "arr") throw malformed("expected array, got " + node.t + " at " + path);
      return node.v.map(function (v, i) { return item(v, path + "[" + i + "]"); });
    };
  }
  // fields: [name, type, default (undefined = required)]; forbid: refuse unknown fields.
  function struct(fields, forbid) {
    return function (node, path) {
      if (node.t !== "map") throw malformed("expected object, got " + node.t + " at " + path);
      var out = {};
      node.v.forEach(function (pair) {
        if (pair[0].t !== "str") throw malformed("expected str key, got " + pair[0].t + " in " + path);
        var key = pair[0].v;
        var field = fields.find(function (f) { return f[0] === key; });
        if (!field) {
          if (forbid) throw malformed("unknown field " + JSON.stringify(key) + " at " + path);
          return;
        }
        // every occurrence of a repeated key is checked and the last one wins, as in msgspec
        out[key] = field[1](pair[1], path + "." + key);
      });
      fields.forEach(function (f) {
        if (Object.prototype.hasOwnProperty.call(out, f[0])) return;
        if (f[2] === undefined) throw malformed("object missing required field " + f[0] + " at " + path);
        out[f[0]] = f[2];
      });
      return out;
    };
  }

  var Identifier = str(1, 128);
  var FrontDoor = struct([
    ["id", Identifier], ["endpoint", str(3, 262)], ["transport", str(1, 16), "udp"],
    ["priority", int(0n, 65535n), 0n],
  ], true);
  var Gateway = struct([
    ["id", Identifier], ["region", Identifier], ["public_key", str(44, 44)],
    ["front_doors", tuple(FrontDoor), []], ["egress_countries", tuple(str(2, 2)), []],
  ], true);
  var Announcement = struct([
    ["key_id", str(null, null, KEY_ID)], ["public_key", str(44, 44)], ["not_before", int(0n, null), 0n],
  ], true);
  var CatalogSchema = struct([
    ["region", Identifier], ["version", int(0n, null)], ["issued_at", int(0n, null)],
    ["expires_at", int(0n, null)], ["gateways", tuple(Gateway), []], ["next_keys", tuple(Announcement), []],
  ], true);
  var SignedSchema = struct([
    ["payload", bin(null, null)], ["key_id", str(null, null, KEY_ID)], ["signature", bin(64, 64)],
  ], false);

  function decode(schema, bytes, what) {
    var node;
    try {
      node = Damm.unpack(bytes);
    } catch (e) {
      if (e instanceof Damm.MsgpackError) throw malformed(what + ": " + e.message);
      throw e;
    }
    return schema(node, "$");
  }

  function b64bytes(s) {
    if (typeof s !== "string" || !B64.test(s)) return null;
    var bin = atob(s);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function hex(bytes) {
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
  }

  async function keyIdFor(publicKey) {
    return hex(new Uint8Array(await crypto.subtle.digest("SHA-256", publicKey))).slice(0, 16);
  }

  async function checkInvariants(catalog) {
    if (catalog.expires_at < catalog.issued_at) throw malformed("catalog expires before it is issued");
    var ids = new Set(catalog.gateways.map(function (g) { return g.id; }));
    if (ids.size !== catalog.gateways.length) throw malformed("catalog lists a gateway id twice");
    for (var a of catalog.next_keys) {
      var pk = KEY32.test(a.public_key) ? b64bytes(a.public_key) : null;
      if (!pk) throw malformed("announced key is not well formed");
      if ((await keyIdFor(pk)) !== a.key_id) {
        throw malformed("announced key id " + a.key_id + " does not match its public key");
      }
    }
  }

  async function signatureOk(publicKey, signature, payload) {
    var digest = new Uint8Array(await crypto.subtle.digest("SHA-512", payload));
    var message = new Uint8Array(CONTEXT.length + digest.length);
    message.set(CONTEXT, 0);
    message.set(digest, CONTEXT.length);
    try {
      var key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
      return await crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
    } catch (e) {
      return false; // a key WebCrypto will not import verifies nothing, as in libsodium
    }
  }

  // trust: the device.json "trust" object ({pinned, min_version, region}); now: unix seconds.
  // Resolves to {ok: true, catalog, keyId} or {ok: false, code, message, detail}.
  Damm.verifyCatalog = async function (signedBytes, trust, now) {
    try {
      if (!trust || typeof trust !== "object" || !trust.pinned || typeof trust.pinned !== "object" ||
          typeof trust.region !== "string" || !Number.isSafeInteger(trust.min_version)) {
        throw new Refusal("state_missing", "device.json has no catalog trust (load device.json with the catalog)");
      }
      var signed = decode(SignedSchema, signedBytes, "signed catalog");
      var pinned = Object.prototype.hasOwnProperty.call(trust.pinned, signed.key_id)
        ? trust.pinned[signed.key_id] : undefined;
      if (typeof pinned !== "string") {
        throw new Refusal("catalog_unknown_key", "key " + signed.key_id + " is not pinned (pinned: " +
          (Object.keys(trust.pinned).sort().join(", ") || "-") + ")");
      }
      var publicKey = b64bytes(pinned);
      if (!publicKey || publicKey.length !== 32) {
        throw new Refusal("catalog_unknown_key", "the catalog key is not a base64 Ed25519 public key");
      }
      if (!(await signatureOk(publicKey, signed.signature, signed.payload))) {
        throw new Refusal("catalog_bad_signature", "signature by key " + signed.key_id + " does not verify");
      }
      var catalog = decode(CatalogSchema, signed.payload, "catalog payload");
      await checkInvariants(catalog);
      var t = BigInt(now);
      if (catalog.region !== trust.region) {
        throw new Refusal("catalog_wrong_region", "catalog is for region " + quote(catalog.region) +
          ", device is in " + quote(trust.region));
      }
      if (catalog.expires_at + SKEW < t) {
        throw new Refusal("catalog_stale", "version " + catalog.version + " expired at " + catalog.expires_at + ", now is " + t);
      }
      if (catalog.issued_at - SKEW > t) {
        throw new Refusal("catalog_stale", "version " + catalog.version + " is issued at " + catalog.issued_at +
          ", in the future (now is " + t + "); check the device clock");
      }
      if (catalog.version < BigInt(trust.min_version)) {
        throw new Refusal("catalog_rollback", "version " + catalog.version + " is older than accepted version " + trust.min_version);
      }
      return { ok: true, catalog: catalog, keyId: signed.key_id };
    } catch (e) {
      if (e instanceof Refusal) return { ok: false, code: e.code, message: MESSAGES[e.code], detail: e.detail };
      throw e;
    }
  };

  Damm.b64bytes = b64bytes;
  Damm.hex = hex;
  Damm.keyIdFor = keyIdFor;
})();
