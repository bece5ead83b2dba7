// Checks every dashboards/*.json against Grafana's published dashboard schema: the TypeScript
// types of @grafana/schema (generated from Grafana's CUE schema). Each dashboard becomes an
// object literal typed as the schema's `Dashboard` (enums accepted as their JSON values), and
// the TypeScript compiler rejects unknown fields, missing required fields and wrong types.
// On top of the types: panel ids unique, every panel inside the 24-column grid, known panel
// types, a datasource on every query. Run: npm ci && node check.mjs
import { readFileSync, readdirSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const here = dirname(fileURLToPath(import.meta.url));
const dashboardsDir = join(here, '..');
const require = createRequire(import.meta.url);
const ts = require('typescript');

const PANEL_TYPES = new Set(['timeseries', 'heatmap', 'stat', 'row', 'gauge', 'table', 'bargauge', 'text']);
const problems = [];

function structural(name, d) {
  const ids = new Set();
  const walk = (panels) => {
    for (const p of panels ?? []) {
      if (ids.has(p.id)) problems.push(`${name}: panel id ${p.id} used twice`);
      ids.add(p.id);
      if (!PANEL_TYPES.has(p.type)) problems.push(`${name}: panel ${p.id} has unknown type ${p.type}`);
      const g = p.gridPos;
      if (!g || g.x < 0 || g.w < 1 || g.x + g.w > 24 || g.h < 1) problems.push(`${name}: panel ${p.id} is outside the grid`);
      for (const t of p.targets ?? []) {
        if (!t.datasource && !p.datasource) problems.push(`${name}: panel ${p.id} query ${t.refId} has no datasource`);
        if (typeof t.refId !== 'string') problems.push(`${name}: panel ${p.id} has a query without refId`);
        if (!t.expr) problems.push(`${name}: panel ${p.id} query ${t.refId} has no expr`);
      }
      if (p.type !== 'row' && !p.description) problems.push(`${name}: panel ${p.id} (${p.title}) has no description`);
      walk(p.panels);
    }
  };
  walk(d.panels);
  if (!d.uid || !d.title) problems.push(`${name}: needs a uid and a title`);
}

const files = readdirSync(dashboardsDir).filter((f) => f.endsWith('.json'));
if (files.length === 0) {
  console.error('no dashboards found');
  process.exit(1);
}
const work = join(here, '.check');
rmSync(work, { recursive: true, force: true });
mkdirSync(work);
const sources = [];
for (const f of files) {
  const text = readFileSync(join(dashboardsDir, f), 'utf8');
  let d;
  try {
    d = JSON.parse(text);
  } catch (e) {
    problems.push(`${f}: not JSON: ${e.message}`);
    continue;
  }
  structural(f, d);
  const src = join(work, f.replace(/\.json$/, '.ts'));
  writeFileSync(
    src,
    `import type { Dashboard } from '@grafana/schema';\n` +
      `// The schema's types as JSON carries them: string enums as their values.\n` +
      `// A query (DataQuery: it has refId) is open in the schema: each datasource adds its fields.\n` +
      `type Json<T> = T extends string ? (string extends T ? string : \`\${T}\`)\n` +
      `  : T extends number | boolean | null | undefined ? T\n` +
      `  : T extends Array<infer U> ? Array<Json<U>>\n` +
      `  : T extends { refId: string } ? { [K in keyof T]: Json<T[K]> } & Record<string, unknown>\n` +
      `  : T extends object ? { [K in keyof T]: Json<T[K]> }\n` +
      `  : T;\n` +
      `export const dashboard: Json<Dashboard> = ${text.trim()};\n`,
  );
  sources.push(src);
}
const program = ts.createProgram(sources, {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.ESNext,
  moduleResolution: ts.ModuleResolutionKind.Bundler,
  skipLibCheck: true,
  typeRoots: [],
  types: [],
  baseUrl: here,
});
for (const diag of ts.getPreEmitDiagnostics(program)) {
  const where = diag.file
    ? `${diag.file.fileName.replace(work + '/', '')}:${diag.file.getLineAndCharacterOfPosition(diag.start).line + 1 - 8}`
    : '';
  problems.push(`${where}: ${ts.flattenDiagnosticMessageText(diag.messageText, '\n')}`);
}
rmSync(work, { recursive: true, force: true });
if (problems.length) {
  for (const p of problems) console.error(p);
  console.error(`${problems.length} problem(s)`);
  process.exit(1);
}
console.log(`${files.join(', ')}: valid against @grafana/schema Dashboard (${files.length} dashboard(s))`);
