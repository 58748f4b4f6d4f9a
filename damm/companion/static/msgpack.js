// A strict MessagePack reader written for the catalog check, not a vendored general decoder: the
// page must refuse exactly what msgspec refuses (trailing bytes, invalid UTF-8, a float where an
// int belongs, bin where str belongs), so values come back tagged with their wire type and the
// schema in catalog.js decides. Integers are BigInt: catalog versions and times are uint64.
"use strict";
var Damm = window.Damm || (window.Damm = {});

(function () {
  var utf8 = new TextDecoder("utf-8", { fatal: true });
  var MAX_DEPTH = 256;

  function MsgpackError(message) {
    this.message = message;
  }

  Damm.MsgpackError = MsgpackError;

  Damm.unpack = function (bytes) {
    var view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    var pos = 0;

    function need(n) {
      if (pos + n > bytes.length) throw new MsgpackError("input data was truncated");
    }
    function u8() { need(1); return bytes[pos++]; }
    function u16() { need(2); var v = view.getUint16(pos); pos += 2; return v; }
    function u32() { need(4); var v = view.getUint32(pos); pos += 4; return v; }
    function take(n) { need(n); var s = bytes.subarray(pos, pos + n); pos += n; return s; }
    function str(n) {
      try {
        return { t: "str", v: utf8.decode(take(n)) };
      } catch (e) {
        if (e instanceof MsgpackError) throw e;
        throw new MsgpackError("invalid UTF-8 encoded string");
      }
    }
    function arr(n, depth) {
      var out = [];
      for (var i = 0; i < n; i++) out.push(value(depth + 1));
      return { t: "arr", v: out };
    }
    function map(n, depth) {
      var out = [];
      for (var i = 0; i < n; i++) {
        var k = value(depth + 1);
        out.push([k, value(depth + 1)]);
      }
      return { t: "map", v: out };
    }
    function value(depth) {
      if (depth > MAX_DEPTH) throw new MsgpackError("nesting is too deep");
      var b = u8();
      if (b <= 0x7f) return { t: "int", v: BigInt(b) };
      if (b >= 0xe0) return { t: "int", v: BigInt(b - 256) };
      if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f, depth);
      if (b >= 0x90 && b <= 0x9f) return arr(b & 0x0f, depth);
      if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f);
      switch (b) {
        case 0xc0: return { t: "nil" };
        case 0xc2: return { t: "bool", v: false };
        case 0xc3: return { t: "bool", v: true };
        case 0xc4: return { t: "bin", v: take(u8()) };
        case 0xc5: return { t: "bin", v: take(u16()) };
        case 0xc6: return { t: "bin", v: take(u32()) };
        case 0xc7: { var n8 = u8(); u8(); take(n8); return { t: "ext" }; }
        case 0xc8: { var n16 = u16(); u8(); take(n16); return { t: "ext" }; }
        case 0xc9: { var n32 = u32(); u8(); take(n32); return { t: "ext" }; }
        case 0xca: take(4); return { t: "float" };
        case 0xcb: take(8); return { t: "float" };
        case 0xcc: return { t: "int", v: BigInt(u8()) };
        case 0xcd: return { t: "int", v: BigInt(u16()) };
        case 0xce: return { t: "int", v: BigInt(u32()) };
        case 0xcf: need(8); pos += 8; return { t: "int", v: view.getBigUint64(pos - 8) };
        case 0xd0: need(1); pos += 1; return { t: "int", v: BigInt(view.getInt8(pos - 1)) };
        case 0xd1: need(2); pos += 2; return { t: "int", v: BigInt(view.getInt16(pos - 2)) };
        case 0xd2: need(4); pos += 4; return { t: "int", v: BigInt(view.getInt32(pos - 4)) };
        case 0xd3: need(8); pos += 8; return { t: "int", v: view.getBigInt64(pos - 8) };
        case 0xd4: u8(); take(1); return { t: "ext" };
        case 0xd5: u8(); take(2); return { t: "ext" };
        case 0xd6: u8(); take(4); return { t: "ext" };
        case 0xd7: u8(); take(8); return { t: "ext" };
        case 0xd8: u8(); take(16); return { t: "ext" };
        case 0xd9: return str(u8());
        case 0xda: return str(u16());
        case 0xdb: return str(u32());
        case 0xdc: return arr(u16(), depth);
        case 0xdd: return arr(u32(), depth);
        case 0xde: return map(u16(), depth);
        case 0xdf: return map(u32(), depth);
        default: throw new MsgpackError("invalid opcode 0x" + b.toString(16));
      }
    }

    var result = value(0);
    if (pos !== bytes.length) throw new MsgpackError("trailing characters (byte " + pos + ")");
    return result;
  };
})();
