// The hand-written declaration file and the module agree on what is exported.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as switchboard from "../switchboard.js";

test("switchboard.d.ts declares exactly the module's runtime exports", () => {
  const declarations = readFileSync(new URL("../switchboard.d.ts", import.meta.url), "utf8");
  const declared = [...declarations.matchAll(/^export declare (?:class|function) (\w+)/gm)]
    .map((match) => match[1])
    .sort();
  assert.deepEqual(declared, Object.keys(switchboard).sort());
});

test("package.json points at the module and its types", () => {
  const manifest = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
  assert.equal(manifest.type, "module");
  assert.deepEqual(manifest.exports["."], { types: "./switchboard.d.ts", default: "./switchboard.js" });
  for (const file of ["switchboard.js", "switchboard.d.ts", "README.md"]) {
    assert.ok(manifest.files.includes(file), file);
  }
  assert.deepEqual(manifest.dependencies ?? {}, {});
});
