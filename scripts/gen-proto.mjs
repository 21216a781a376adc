// Generates protobufjs static code (the hot-path decoder) and its typings from api/proto/*.proto.
// Output goes to api/proto/gen/ (git-ignored); scripts/copy-gen.mjs copies it into dist/.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const cliDir = path.dirname(require.resolve('protobufjs-cli/package.json'));
const out = 'api/proto/gen';
const js = `${out}/crmstream.js`;
mkdirSync(out, { recursive: true });
const node = process.execPath;
// --keep-case: the JSON field names (snake_case) are the message field names, so one shape serves both.
execFileSync(node, [path.join(cliDir, 'bin/pbjs'), '-t', 'static-module', '-w', 'es6', '--keep-case',
  '--dependency', 'protobufjs/minimal.js', '--no-verify', '--no-delimited', '--no-convert',
  '-o', js, 'api/proto/crmstream.proto'], { stdio: 'inherit' });
// protobufjs/minimal is CommonJS: a namespace import has no `roots`; take the default export instead.
// int64 fields (ms timestamps, sequences) stay below 2^53, so decode them to plain numbers, not Long objects:
// that keeps decoded events one fixed shape and avoids an allocation per timestamp.
let src = readFileSync(js, 'utf8');
src = src.replace('import * as $protobuf from "protobufjs/minimal.js";',
  'import $protobuf from "protobufjs/minimal.js";\n$protobuf.util.Long = undefined;\n$protobuf.configure();');
writeFileSync(js, src);
execFileSync(node, [path.join(cliDir, 'bin/pbts'), '-o', `${out}/crmstream.d.ts`, js], { stdio: 'inherit' });
