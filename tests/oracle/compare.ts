/**
 * Row-set comparison for oracle tests: rows are matched by their key fields, then every other
 * field is compared. Numbers are equal within a relative tolerance (money is IEEE double, summed
 * in different orders by the engine and by DuckDB) or when both are tiny; null only equals null.
 */

const MAX_MESSAGES = 50;
/** Absolute tolerance: differences this small are rounding noise around 0 (e.g. 0.1 + 0.2 − 0.3). */
const ABS_TOL = 1e-9;

function show(v: unknown): string {
  return typeof v === 'string' ? JSON.stringify(v) : String(v);
}

function valuesEqual(a: unknown, b: unknown, relTol: number): boolean {
  if (a === null || b === null) return a === b;
  if (typeof a === 'number' && typeof b === 'number') {
    if (Number.isNaN(a) || Number.isNaN(b)) return Number.isNaN(a) && Number.isNaN(b);
    if (a === b) return true; // also equal infinities
    const diff = Math.abs(a - b);
    return diff <= ABS_TOL || diff <= relTol * Math.max(Math.abs(a), Math.abs(b));
  }
  return Object.is(a, b);
}

/**
 * Differences between `actual` and `expected`, as human-readable lines: rows missing from actual,
 * extra rows in actual, duplicate keys and field mismatches. Empty when they agree. At most 50
 * lines, then one line with how many more were left out.
 */
export function compareRows<T extends object>(
  actual: readonly T[],
  expected: readonly T[],
  keyFields: readonly (keyof T)[],
  relTol = 1e-9,
): string[] {
  const diffs: string[] = [];
  const keyOf = (row: T): string => keyFields.map((k) => `${String(k)}=${show(row[k])}`).join(' ');

  const index = (rows: readonly T[], side: string): Map<string, T> => {
    const m = new Map<string, T>();
    for (const row of rows) {
      const key = keyOf(row);
      if (m.has(key)) diffs.push(`duplicate ${side} row [${key}]`);
      else m.set(key, row);
    }
    return m;
  };
  const act = index(actual, 'actual');
  const exp = index(expected, 'expected');

  const keySet = new Set<keyof T>(keyFields);
  for (const [key, e] of exp) {
    const a = act.get(key);
    if (a === undefined) {
      diffs.push(`missing row [${key}]`);
      continue;
    }
    // Fields of either row, so a field present on one side only is reported too.
    const fields = new Set<keyof T>([...(Object.keys(e) as (keyof T)[]), ...(Object.keys(a) as (keyof T)[])]);
    for (const f of fields) {
      if (keySet.has(f)) continue;
      if (!valuesEqual(a[f], e[f], relTol)) {
        diffs.push(`[${key}] ${String(f)}: actual ${show(a[f])}, expected ${show(e[f])}`);
      }
    }
  }
  for (const key of act.keys()) {
    if (!exp.has(key)) diffs.push(`extra row [${key}]`);
  }

  if (diffs.length <= MAX_MESSAGES) return diffs;
  return [...diffs.slice(0, MAX_MESSAGES), `... and ${diffs.length - MAX_MESSAGES} more differences`];
}
