// Install guidance per platform. Each guide ends with how to tell the tunnel works, because
// "imported" is not "working": the handshake and a ping through the tunnel are the evidence.
"use strict";
var Damm = window.Damm || (window.Damm = {});

(function () {
  // ctx: {file, name, probe, address}
  function checks(ctx, how) {
    return [
      how,
      "A \u201clatest handshake\u201d a few seconds old means the gateway answered. No handshake after a minute: run \u201cdamm device diagnose\u201d on a computer with the device's files, or load its export in this page.",
      { text: "Then check traffic goes through the tunnel: ping the gateway's tunnel address (usually " + ctx.probe + ").", code: "ping " + ctx.probe },
    ];
  }

  Damm.PLATFORMS = [
    { id: "windows", label: "Windows", guide: function (ctx) {
      return { intro: "With the official WireGuard app for Windows.", steps: [
        "Install WireGuard for Windows from wireguard.com/install (the official installer).",
        "Open WireGuard, choose \u201cImport tunnel(s) from file\u201d and pick " + ctx.file + ".",
        "Select the tunnel \u201c" + ctx.name + "\u201d and press \u201cActivate\u201d.",
      ], check: checks(ctx, "In the app, the tunnel's status shows \u201cActive\u201d with a latest handshake time.") };
    } },
    { id: "macos", label: "macOS", guide: function (ctx) {
      return { intro: "With the official WireGuard app from the Mac App Store.", steps: [
        "Install \u201cWireGuard\u201d from the Mac App Store.",
        "Open it, choose \u201cImport Tunnel(s) from File\u2026\u201d and pick " + ctx.file + "; allow the VPN configuration when macOS asks.",
        "Select the tunnel \u201c" + ctx.name + "\u201d and press \u201cActivate\u201d.",
      ], check: checks(ctx, "The tunnel shows \u201cActive\u201d; its detail pane shows the latest handshake.") };
    } },
    { id: "ios", label: "iOS", guide: function (ctx) {
      return { intro: "With the official WireGuard app from the App Store.", steps: [
        "Install \u201cWireGuard\u201d from the App Store.",
        "Tap \u201c+\u201d, then \u201cCreate from QR code\u201d and scan the QR code on this page (it holds the private key: scan it with this phone only). Or send yourself " + ctx.file + " and open it with WireGuard.",
        "Name the tunnel, allow adding the VPN configuration, and turn the tunnel on.",
      ], check: checks(ctx, "Tap the tunnel: \u201cLatest handshake\u201d shows a recent time and \u201cData received\u201d grows.") };
    } },
    { id: "android", label: "Android", guide: function (ctx) {
      return { intro: "With the official WireGuard app from Google Play or F-Droid.", steps: [
        "Install \u201cWireGuard\u201d from Google Play or F-Droid.",
        "Tap \u201c+\u201d, then \u201cScan from QR code\u201d and scan the QR code on this page (it holds the private key: scan it with this phone only), or \u201cImport from file or archive\u201d and pick " + ctx.file + ".",
        "Turn the tunnel on and accept Android's VPN connection request.",
      ], check: checks(ctx, "Tap the tunnel: the peer shows \u201cLatest handshake\u201d a few seconds ago and received bytes grow.") };
    } },
    { id: "linux", label: "Linux (wg-quick)", guide: function (ctx) {
      return { intro: "With wireguard-tools (Debian/Ubuntu: apt install wireguard-tools).", steps: [
        { text: "Install the profile for wg-quick, readable by root only:", code: "sudo install -m 600 " + ctx.file + " /etc/wireguard/wg0.conf" },
        { text: "Bring the tunnel up now:", code: "sudo wg-quick up wg0" },
        { text: "And at every boot:", code: "sudo systemctl enable wg-quick@wg0" },
      ], check: checks(ctx, { text: "Show the interface; \u201clatest handshake\u201d should be recent:", code: "sudo wg show wg0" }) };
    } },
    { id: "networkmanager", label: "Linux (NetworkManager)", guide: function (ctx) {
      return { intro: "With NetworkManager 1.16 or later (GNOME, KDE and most desktops).", steps: [
        { text: "Import the profile as a connection (its name comes from the file name):", code: "sudo nmcli connection import type wireguard file " + ctx.file },
        { text: "Bring it up (it also comes up at login unless you turn autoconnect off):", code: "nmcli connection up " + ctx.name },
      ], check: checks(ctx, { text: "Show the connection and its peer; \u201clatest handshake\u201d should be recent:", code: "sudo wg show " + ctx.name }) };
    } },
  ];

  // The guide to open first, from what the browser says it runs on.
  Damm.detectPlatform = function (nav) {
    var ua = (nav.userAgent || "");
    var platform = ((nav.userAgentData && nav.userAgentData.platform) || nav.platform || "");
    if (/Android/i.test(ua) || /Android/i.test(platform)) return "android";
    if (/iPhone|iPad|iPod/i.test(ua) || /^iOS$|iPhone|iPad/i.test(platform)) return "ios";
    if (/Win/i.test(platform)) return "windows";
    if (/Mac/i.test(platform)) return "macos";
    if (/Linux|X11|CrOS/i.test(platform)) return "linux";
    return "linux";
  };
})();
