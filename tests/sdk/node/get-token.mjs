// Gets one token the way an unmodified Node.js application in a pod does, and prints what it got.
//
// Run inside a pod network namespace by podid's tests:
//   node get-token.mjs --credential mi|dac [--client-id ID] [--resource-id ID] [--object-id ID] [--scope S]
//
// Prints one JSON line like get_token.py; the token itself is never printed.
import { createHash } from "node:crypto";
import { DefaultAzureCredential, ManagedIdentityCredential } from "@azure/identity";

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function claimsOf(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
}

function credential() {
  if (arg("--credential") === "dac") {
    return new DefaultAzureCredential();
  }
  if (arg("--client-id")) return new ManagedIdentityCredential({ clientId: arg("--client-id") });
  if (arg("--resource-id")) return new ManagedIdentityCredential({ resourceId: arg("--resource-id") });
  if (arg("--object-id")) return new ManagedIdentityCredential({ objectId: arg("--object-id") });
  return new ManagedIdentityCredential();
}

const started = performance.now();
try {
  const token = await credential().getToken(arg("--scope") ?? "https://management.azure.com/.default");
  console.log(JSON.stringify({
    ok: true,
    expires_on: token.expiresOnTimestamp / 1000,
    claims: claimsOf(token.token),
    sha256: createHash("sha256").update(token.token).digest("hex"),
    seconds: (performance.now() - started) / 1000,
  }));
} catch (e) {
  console.log(JSON.stringify({
    ok: false,
    error: e?.name ?? "Error",
    message: String(e?.message ?? e).slice(0, 2000),
    seconds: (performance.now() - started) / 1000,
  }));
  process.exitCode = 1;
}
