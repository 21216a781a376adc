// tsc does not copy the generated protobuf JavaScript; put it beside the compiled code.
import { cpSync, mkdirSync } from 'node:fs';
mkdirSync('dist/api/proto/gen', { recursive: true });
cpSync('api/proto/gen', 'dist/api/proto/gen', { recursive: true });
