// The wg-quick profile format, read the way wg(8) and wg-quick(8) read it: sections, keys matched
// case-insensitively, "#" starts a comment. Every refusal names its line, because the person
// reading it is usually holding a file someone else edited.
"use strict";
var Damm = window.Damm || (window.Damm = {});

(function () {
  var KEYS = {
    interface: ["PrivateKey", "ListenPort", "FwMark", "Address", "DNS", "MTU", "Table",
      "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig"],
    peer: ["PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive"],
  };
  var SINGLE = ["privatekey", "listenport", "fwmark", "mtu", "table", "saveconfig",
    "publickey", "presharedkey", "endpoint", "persistentkeepalive"];
  var KEY32 = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;
  var HOST = "(?:\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)";
  var ENDPOINT = new RegExp("^" + HOST + ":([0-9]{1,5})$");
  var DOMAIN = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/;

  function ParseError(line, message) {
    this.line = line;
    this.message = line ? "line " + line + ": " + message : message;
  }

  function isIPv4(s) {
    var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
    if (!m) return false;
    for (var i = 1; i <= 4; i++) {
      if (Number(m[i]) > 255 || (m[i].length > 1 && m[i][0] === "0")) return false;
    }
    return true;
  }

  function isIPv6(s) {
    if (!/^[0-9A-Fa-f:.]+$/.test(s) || s.indexOf(":") < 0) return false;
    try {
      new URL("http://[" + s + "]/"); // the URL parser's IPv6 grammar; it makes no request
      return true;
    } catch (e) {
      return false;
    }
  }

  function ipVersion(s) {
    if (isIPv4(s)) return 4;
    if (isIPv6(s)) return 6;
    return 0;
  }

  // "10.44.0.10/32" -> {ip, prefix, version}; prefix required unless optional.
  function cidr(value, prefixOptional) {
    var parts = value.split("/");
    if (parts.length > 2) return null;
    var version = ipVersion(parts[0]);
    if (!version) return null;
    var max = version === 4 ? 32 : 128;
    if (parts.length === 1) {
      return prefixOptional ? { ip: parts[0], prefix: max, version: version } : null;
    }
    if (!/^\d{1,3}$/.test(parts[1]) || Number(parts[1]) > max) return null;
    return { ip: parts[0], prefix: Number(parts[1]), version: version };
  }

  function list(value) {
    return value.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
  }

  function canonicalKey(section, key) {
    var names = KEYS[section];
    for (var i = 0; i < names.length; i++) {
      if (names[i].toLowerCase() === key.toLowerCase()) return names[i];
    }
    return null;
  }

  function checkValue(name, value, line) {
    switch (name) {
      case "PrivateKey":
      case "PublicKey":
      case "PresharedKey":
        if (!KEY32.test(value)) {
          throw new ParseError(line, name + " is not a base64 WireGuard key (44 characters ending in =)");
        }
        return value;
      case "Address":
        return list(value).map(function (a) {
          var c = cidr(a, true);
          if (!c) throw new ParseError(line, "Address \u201c" + a + "\u201d is not an IP address with a /prefix");
          return a;
        });
      case "AllowedIPs":
        return list(value).map(function (a) {
          var c = cidr(a, true);
          if (!c) throw new ParseError(line, "AllowedIPs entry \u201c" + a + "\u201d is not a network");
          return a;
        });
      case "DNS":
        return list(value).map(function (a) {
          if (!ipVersion(a) && !DOMAIN.test(a)) {
            throw new ParseError(line, "DNS entry \u201c" + a + "\u201d is neither an IP address nor a domain");
          }
          return a;
        });
      case "Endpoint": {
        var m = ENDPOINT.exec(value);
        if (!m || Number(m[1]) < 1 || Number(m[1]) > 65535) {
          throw new ParseError(line, "Endpoint \u201c" + value + "\u201d is not host:port");
        }
        return value;
      }
      case "ListenPort":
      case "PersistentKeepalive":
      case "MTU":
        if (!/^\d{1,5}$/.test(value) || Number(value) > 65535) {
          if (!(name === "PersistentKeepalive" && value === "off")) {
            throw new ParseError(line, name + " \u201c" + value + "\u201d is not a number from 0 to 65535");
          }
        }
        return value;
      default:
        return value;
    }
  }

  // Returns {interface: {...}, peers: [{...}], hooks: [names], lines: {key: line}}; throws ParseError.
  Damm.parseConfig = function (text) {
    if (typeof text !== "string" || !text.trim()) throw new ParseError(0, "the profile is empty");
    var lines = text.split(/\r?\n/);
    var result = { interface: null, peers: [], hooks: [] };
    var section = null;
    var current = null;
    for (var i = 0; i < lines.length; i++) {
      var n = i + 1;
      var raw = lines[i];
      if (raw.indexOf("\u0000") >= 0) throw new ParseError(n, "contains a NUL byte; this is not a text profile");
      var hash = raw.indexOf("#");
      var line = (hash >= 0 ? raw.slice(0, hash) : raw).trim();
      if (!line) continue;
      var header = /^\[\s*([A-Za-z]+)\s*\]$/.exec(line);
      if (header) {
        section = header[1].toLowerCase();
        if (section === "interface") {
          if (result.interface) throw new ParseError(n, "a second [Interface] section (the first is on line " + result.interface._line + ")");
          current = result.interface = { _line: n, _keys: {} };
        } else if (section === "peer") {
          current = { _line: n, _keys: {} };
          result.peers.push(current);
        } else {
          throw new ParseError(n, "unknown section [" + header[1] + "]; expected [Interface] or [Peer]");
        }
        continue;
      }
      if (line[0] === "[") throw new ParseError(n, "a section header must look like [Interface] or [Peer]");
      var eq = line.indexOf("=");
      if (eq <= 0) throw new ParseError(n, "expected \u201cKey = value\u201d");
      var key = line.slice(0, eq).trim();
      var value = line.slice(eq + 1).trim();
      if (!current) throw new ParseError(n, key + " appears before any [Interface] or [Peer] section");
      var name = canonicalKey(section, key);
      if (!name) {
        var where = section === "interface" ? "[Interface]" : "[Peer]";
        throw new ParseError(n, "unknown key \u201c" + key + "\u201d in " + where);
      }
      if (!value) throw new ParseError(n, name + " has no value");
      var lower = name.toLowerCase();
      if (SINGLE.indexOf(lower) >= 0 && current._keys[lower]) {
        throw new ParseError(n, "a second " + name + " (the first is on line " + current._keys[lower] + ")");
      }
      var checked = checkValue(name, value, n);
      if (Array.isArray(checked) && Array.isArray(current[name])) {
        current[name] = current[name].concat(checked);
      } else {
        current[name] = checked;
      }
      current._keys[lower] = current._keys[lower] || n;
      if (/^(Pre|Post)(Up|Down)$/.test(name) && result.hooks.indexOf(name) < 0) result.hooks.push(name);
    }
    if (!result.interface) throw new ParseError(0, "the profile has no [Interface] section");
    if (!result.interface.PrivateKey) {
      throw new ParseError(result.interface._line, "[Interface] has no PrivateKey");
    }
    if (!result.peers.length) throw new ParseError(0, "the profile has no [Peer] section");
    result.peers.forEach(function (peer) {
      if (!peer.PublicKey) throw new ParseError(peer._line, "[Peer] has no PublicKey");
    });
    return result;
  };

  Damm.ParseError = ParseError;
  Damm.cidr = cidr;
})();
