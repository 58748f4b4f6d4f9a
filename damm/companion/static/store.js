// Local copies of profiles in IndexedDB: this browser, this computer, nothing else.
"use strict";
var Damm = window.Damm || (window.Damm = {});

(function () {
  var DB = "damm-companion";
  var STORE = "profiles";

  function open() {
    return new Promise(function (resolve, reject) {
      var req = indexedDB.open(DB, 1);
      req.onupgradeneeded = function () {
        req.result.createObjectStore(STORE, { keyPath: "id" });
      };
      req.onsuccess = function () { resolve(req.result); };
      req.onerror = function () { reject(req.error); };
    });
  }

  function run(mode, fn) {
    return open().then(function (db) {
      return new Promise(function (resolve, reject) {
        var tx = db.transaction(STORE, mode);
        var result = fn(tx.objectStore(STORE));
        tx.oncomplete = function () { db.close(); resolve(result && "result" in result ? result.result : undefined); };
        tx.onerror = function () { db.close(); reject(tx.error); };
        tx.onabort = function () { db.close(); reject(tx.error); };
      });
    });
  }

  Damm.store = {
    list: function () {
      return run("readonly", function (s) { return s.getAll(); }).then(function (rows) {
        return (rows || []).sort(function (a, b) { return a.savedAt < b.savedAt ? -1 : 1; });
      });
    },
    put: function (record) { return run("readwrite", function (s) { s.put(record); }); },
    remove: function (id) { return run("readwrite", function (s) { s.delete(id); }); },
  };
})();
