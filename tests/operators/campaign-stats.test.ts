import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  msprtPValue,
  nextAlwaysValidP,
  sampleRatioMismatch,
  twoProportionTest,
  type TwoProportionResult,
} from '../../operators/campaign-stats.js';

/**
 * Campaign experiment statistics, checked against oracles written here from first principles
 * (Simpson integration of the normal density, the exact chi-square survival recurrence) rather than
 * against the @stdlib functions the implementation uses, plus published reference values.
 */

// ---------------------------------------------------------------------------------------------
// Independent oracles.

const SQRT_2PI = Math.sqrt(2 * Math.PI);
const density = (t: number): number => Math.exp((-t * t) / 2) / SQRT_2PI;

/** Composite Simpson's rule with `m` (even) intervals. */
function simpson(f: (t: number) => number, a: number, b: number, m = 4000): number {
  const h = (b - a) / m;
  let s = f(a) + f(b);
  for (let i = 1; i < m; i++) s += (i % 2 === 1 ? 4 : 2) * f(a + i * h);
  return (s * h) / 3;
}

/** ∫_0^|x| φ, capped at |x| = 40 where the remaining mass is far below double precision. */
const halfMass = (x: number): number => simpson(density, 0, Math.min(Math.abs(x), 40));
/** Standard normal CDF. */
const Phi = (x: number): number => (x >= 0 ? 0.5 + halfMass(x) : 0.5 - halfMass(x));
/** Two-sided normal tail 2·(1 − Φ(|z|)). */
const twoSided = (z: number): number => 2 * (0.5 - halfMass(z));

/** Standard normal quantile by bisection on the oracle CDF (memoised: each call costs 200 CDFs). */
const quantiles = new Map<number, number>();
function PhiInv(p: number): number {
  const known = quantiles.get(p);
  if (known !== undefined) return known;
  let lo = -40;
  let hi = 40;
  for (let i = 0; i < 200; i++) {
    const mid = (lo + hi) / 2;
    if (Phi(mid) < p) lo = mid;
    else hi = mid;
  }
  quantiles.set(p, (lo + hi) / 2);
  return (lo + hi) / 2;
}

/** Γ(a) for a a positive integer or half-integer: Γ(1) = 1, Γ(1/2) = √π, Γ(a + 1) = a·Γ(a). */
function gammaHalf(a: number): number {
  let g = Number.isInteger(a) ? 1 : Math.sqrt(Math.PI);
  for (let b = Number.isInteger(a) ? 1 : 0.5; b < a; b++) g *= b;
  return g;
}

/**
 * P(χ²_k > x): df 1 via the normal (χ²₁ = Z²), df 2 exactly exp(−x/2), and higher df by the exact
 * recurrence Q(x; k + 2) = Q(x; k) + (x/2)^{k/2} e^{−x/2} / Γ(k/2 + 1).
 */
function chi2Sf(x: number, k: number): number {
  let q = k % 2 === 1 ? twoSided(Math.sqrt(x)) : Math.exp(-x / 2);
  for (let j = k % 2 === 1 ? 1 : 2; j < k; j += 2) q += ((x / 2) ** (j / 2) * Math.exp(-x / 2)) / gammaHalf(j / 2 + 1);
  return q;
}

/** |a − b| within an absolute tolerance plus a relative one (tails are tiny numbers). */
function close(actual: number | null, expected: number | null, abs = 1e-9, rel = 1e-7): boolean {
  if (actual === null || expected === null) return actual === expected;
  return Math.abs(actual - expected) <= abs + rel * Math.abs(expected);
}

/** The two-proportion results, restated from the definitions with the oracle distributions. */
function oracleTest(x1: number, n1: number, x0: number, n0: number, confidence = 0.95): TwoProportionResult {
  const p1 = x1 / n1;
  const p0 = x0 / n0;
  const zc = PhiInv(1 - (1 - confidence) / 2);
  const se = Math.sqrt((p1 * (1 - p1)) / n1 + (p0 * (1 - p0)) / n0);
  const pp = (x1 + x0) / (n1 + n0);
  const pooled = Math.sqrt(pp * (1 - pp) * (1 / n1 + 1 / n0));
  const z = pooled > 0 ? (p1 - p0) / pooled : null;
  const seLog = x1 > 0 && x0 > 0 ? Math.sqrt((1 - p1) / x1 + (1 - p0) / x0) : 0;
  const rel = (s: number): number | null => (seLog > 0 ? Math.exp(Math.log(p1 / p0) + s * zc * seLog) - 1 : null);
  return {
    p1, p0, diff: p1 - p0,
    diffLow: se > 0 ? p1 - p0 - zc * se : null,
    diffHigh: se > 0 ? p1 - p0 + zc * se : null,
    relUplift: p0 > 0 ? p1 / p0 - 1 : null,
    relLow: rel(-1), relHigh: rel(1),
    z, pValue: z === null ? null : twoSided(z),
  };
}

/** log Λ of the mSPRT, restated from the paper's formula. */
function oracleLogLambda(x1: number, n1: number, x0: number, n0: number, tau2 = 1e-4): number {
  const p1 = x1 / n1;
  const p0 = x0 / n0;
  const v = (p1 * (1 - p1)) / n1 + (p0 * (1 - p0)) / n0;
  const d = p1 - p0;
  return 0.5 * Math.log(v / (v + tau2)) + (d * d * tau2) / (2 * v * (v + tau2));
}

const FIELDS = ['p1', 'p0', 'diff', 'diffLow', 'diffHigh', 'relUplift', 'relLow', 'relHigh', 'z', 'pValue'] as const;

/** An arm: n in [0, 1e6], x = round(f·n) with f often exactly 0 or 1 to exercise the edges. */
const arm = fc
  .record({
    n: fc.oneof(fc.integer({ min: 0, max: 30 }), fc.integer({ min: 0, max: 1_000_000 })),
    f: fc.oneof(fc.constant(0), fc.constant(1), fc.double({ min: 0, max: 1, noNaN: true })),
  })
  .map(({ n, f }) => ({ n, x: Math.round(f * n) }));

// ---------------------------------------------------------------------------------------------

describe('oracles (self-check against published tables)', () => {
  it('normal CDF, quantile and chi-square survival match tabulated values', () => {
    expect(Phi(1)).toBeCloseTo(0.8413447460685429, 12);
    expect(Phi(1.96)).toBeCloseTo(0.9750021048517795, 12);
    expect(Phi(-3)).toBeCloseTo(0.0013498980316301, 12);
    expect(PhiInv(0.975)).toBeCloseTo(1.959963984540054, 10);
    expect(chi2Sf(3.841458820694124, 1)).toBeCloseTo(0.05, 10);
    expect(chi2Sf(5.991464547107979, 2)).toBeCloseTo(0.05, 12);
    expect(chi2Sf(7.814727903251178, 3)).toBeCloseTo(0.05, 10);
    expect(chi2Sf(6, 4)).toBeCloseTo(Math.exp(-3) * (1 + 3), 12); // closed form for df 4
  });
});

describe('twoProportionTest', () => {
  it('200/1000 vs 150/1000: the textbook example, by hand', () => {
    // pp = 350/2000 = 0.175; pp(1−pp)(1/1000 + 1/1000) = 0.144375 · 0.002 = 2.8875e-4;
    // sqrt = 0.0169926; z = 0.05 / 0.0169926 = 2.94245; z² = 8.6580 (R: prop.test(c(200,150),
    // c(1000,1000), correct = FALSE) gives X-squared = 8.658, p-value = 0.003256).
    // (z ≈ 2.953 / p ≈ 0.00315 sometimes quoted for this example is not reproducible: the unpooled
    // statistic is 0.05 / sqrt(2.875e-4) = 2.9488, p = 0.00319.)
    // Wald: se = sqrt(0.16/1000 + 0.1275/1000) = 0.0169558; 1.959964 · se = 0.033233.
    // Relative: log(4/3) = 0.287682, se = sqrt(0.8/200 + 0.85/150) = 0.098319, ±0.192702.
    const r = twoProportionTest(200, 1000, 150, 1000);
    expect(r.p1).toBe(0.2);
    expect(r.p0).toBe(0.15);
    expect(r.diff).toBeCloseTo(0.05, 12);
    expect(r.z).toBeCloseTo(2.94245, 4);
    expect(r.z! ** 2).toBeCloseTo(8.658, 3);
    expect(r.pValue).toBeCloseTo(0.003256, 6);
    expect(r.diffLow).toBeCloseTo(0.016767, 5);
    expect(r.diffHigh).toBeCloseTo(0.083233, 5);
    expect(r.relUplift).toBeCloseTo(1 / 3, 12);
    expect(r.relLow).toBeCloseTo(0.09964, 4);
    expect(r.relHigh).toBeCloseTo(0.61668, 4);
    // The pooled z-test is the Pearson chi-square test of the 2×2 table: p = P(χ²₁ > z²).
    expect(close(r.pValue, chi2Sf(r.z! ** 2, 1))).toBe(true);
    expect(Object.keys(r)).toEqual([...FIELDS]);
  });

  it('matches the oracle field by field, never NaN, p in [0, 1], intervals contain the estimate', () => {
    fc.assert(
      fc.property(arm, arm, fc.constantFrom(0.8, 0.9, 0.95, 0.99), (t, c, conf) => {
        const r = twoProportionTest(t.x, t.n, c.x, c.n, conf);
        expect(Object.keys(r)).toEqual([...FIELDS]);
        for (const k of FIELDS) expect(r[k] === null || Number.isFinite(r[k])).toBe(true);
        if (t.n === 0 || c.n === 0) {
          expect(r.diff).toBeNull();
          expect(r.pValue).toBeNull();
          return;
        }
        const o = oracleTest(t.x, t.n, c.x, c.n, conf);
        for (const k of FIELDS) expect(close(r[k], o[k], 1e-9, 1e-6), `${k}: ${r[k]} vs ${o[k]}`).toBe(true);
        if (r.pValue !== null) expect(r.pValue >= 0 && r.pValue <= 1).toBe(true);
        if (r.diffLow !== null) expect(r.diffLow <= r.diff! && r.diff! <= r.diffHigh!).toBe(true);
        if (r.relLow !== null) expect(r.relLow <= r.relUplift! && r.relUplift! <= r.relHigh!).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('swapping the arms negates z and diff and keeps the p-value', () => {
    fc.assert(
      fc.property(arm, arm, (t, c) => {
        const a = twoProportionTest(t.x, t.n, c.x, c.n);
        const b = twoProportionTest(c.x, c.n, t.x, t.n);
        expect(b.z === null).toBe(a.z === null);
        expect(b.diff === null).toBe(a.diff === null);
        if (a.z !== null) expect(close(b.z, -a.z, 1e-12)).toBe(true);
        if (a.diff !== null) expect(close(b.diff, -a.diff, 1e-15)).toBe(true);
        expect(close(b.pValue, a.pValue, 1e-15)).toBe(true);
      }),
    );
  });

  it('zeros give null for what they leave undefined', () => {
    const allNull = Object.fromEntries(FIELDS.map((k) => [k, null]));
    expect(twoProportionTest(0, 0, 0, 0)).toEqual(allNull);
    expect(twoProportionTest(0, 0, 10, 100)).toEqual({ ...allNull, p0: 0.1 });
    expect(twoProportionTest(10, 100, 0, 0)).toEqual({ ...allNull, p1: 0.1 });
    // Both arms at 0%: rates and diff exist, nothing else does (z = 0 would read as "no effect").
    expect(twoProportionTest(0, 100, 0, 100)).toEqual({ ...allNull, p1: 0, p0: 0, diff: 0 });
    // Both at 100%: same, plus a relative uplift of exactly 0 with no interval.
    expect(twoProportionTest(50, 50, 80, 80)).toEqual({ ...allNull, p1: 1, p0: 1, diff: 0, relUplift: 0 });
    // Control at 0%: relative uplift is undefined; the absolute comparison is fine.
    const c0 = twoProportionTest(5, 100, 0, 100);
    expect([c0.relUplift, c0.relLow, c0.relHigh]).toEqual([null, null, null]);
    expect(c0.z).not.toBeNull();
    expect(c0.diffLow).not.toBeNull();
    // Treatment at 0%: −100% exactly, but log(0) has no delta-method interval.
    const t0 = twoProportionTest(0, 100, 5, 100);
    expect(t0.relUplift).toBe(-1);
    expect([t0.relLow, t0.relHigh]).toEqual([null, null]);
    // Nonsense counts and confidence levels do not throw.
    expect(twoProportionTest(-1, 10, 1, 10)).toEqual(allNull);
    expect(twoProportionTest(11, 10, 1, 10)).toEqual(allNull);
    expect(twoProportionTest(Number.NaN, 10, 1, 10)).toEqual(allNull);
    const badConf = twoProportionTest(20, 100, 10, 100, 1);
    expect([badConf.diffLow, badConf.diffHigh, badConf.relLow, badConf.relHigh]).toEqual([null, null, null, null]);
    expect(badConf.pValue).not.toBeNull();
  });
});

describe('sampleRatioMismatch', () => {
  it('published examples', () => {
    // E = 5000 per arm; chi2 = 2 · 50² / 5000 = 1.0; P(χ²₁ > 1) = 2(1 − Φ(1)) = 0.3173.
    const ok = sampleRatioMismatch([5050, 4950], [1, 1]);
    expect(ok.chi2).toBeCloseTo(1, 12);
    expect(ok.df).toBe(1);
    expect(ok.pValue).toBeCloseTo(0.317311, 6);
    expect(ok.mismatch).toBe(false);
    // chi2 = 2 · 200² / 5000 = 16; P(χ²₁ > 16) = 2(1 − Φ(4)) = 6.334e-5 < 0.001.
    const bad = sampleRatioMismatch([5200, 4800], [1, 1]);
    expect(bad.chi2).toBeCloseTo(16, 12);
    expect(bad.pValue! / 6.334248e-5).toBeCloseTo(1, 5);
    expect(bad.mismatch).toBe(true);
    expect(sampleRatioMismatch([5200, 4800], [1, 1], 1e-5).mismatch).toBe(false);
    // Three arms: E = 10000/3; chi2 = (66.67² + 2 · 33.33²) / 3333.33 = 2; P(χ²₂ > 2) = e^−1.
    const three = sampleRatioMismatch([3400, 3300, 3300], [1, 1, 1]);
    expect(three.chi2).toBeCloseTo(2, 10);
    expect(three.df).toBe(2);
    expect(three.pValue).toBeCloseTo(Math.exp(-1), 12);
    // A 90/10 split observed exactly; weights need not sum to 1; a zero-weight arm is left out.
    expect(sampleRatioMismatch([9000, 1000, 7], [0.9, 0.1, 0])).toEqual({ chi2: 0, df: 1, pValue: 1, mismatch: false });
  });

  it('matches the chi-square oracle and is invariant to weight scale and arm order', () => {
    const arms = fc.array(fc.record({ count: fc.integer({ min: 0, max: 200_000 }), weight: fc.integer({ min: 0, max: 10 }) }), {
      minLength: 0,
      maxLength: 6,
    });
    fc.assert(
      fc.property(arms, fc.integer({ min: 1, max: 1000 }), (a, scale) => {
        const counts = a.map((x) => x.count);
        const weights = a.map((x) => x.weight);
        const r = sampleRatioMismatch(counts, weights);
        const used = a.filter((x) => x.weight > 0);
        const total = used.reduce((s, x) => s + x.count, 0);
        expect(r.df).toBe(Math.max(0, used.length - 1));
        if (used.length < 2 || total === 0) {
          expect(r).toEqual({ chi2: null, df: r.df, pValue: null, mismatch: false });
          return;
        }
        const wsum = used.reduce((s, x) => s + x.weight, 0);
        const chi2 = used.reduce((s, x) => s + (x.count - (total * x.weight) / wsum) ** 2 / ((total * x.weight) / wsum), 0);
        expect(close(r.chi2, chi2, 1e-9, 1e-9)).toBe(true);
        expect(close(r.pValue, chi2Sf(chi2, used.length - 1), 1e-9, 1e-6)).toBe(true);
        expect(r.mismatch).toBe(r.pValue! < 0.001);
        const scaled = sampleRatioMismatch(counts, weights.map((w) => w * scale));
        expect(close(scaled.pValue, r.pValue, 1e-12, 1e-9)).toBe(true);
        const reversed = sampleRatioMismatch([...counts].reverse(), [...weights].reverse());
        expect(close(reversed.pValue, r.pValue, 1e-12, 1e-9)).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('undefined cases: no test, no mismatch', () => {
    const none = (df: number) => ({ chi2: null, df, pValue: null, mismatch: false });
    expect(sampleRatioMismatch([], [])).toEqual(none(0));
    expect(sampleRatioMismatch([100], [1])).toEqual(none(0));
    expect(sampleRatioMismatch([100, 50], [1, 0])).toEqual(none(0));
    expect(sampleRatioMismatch([0, 0], [1, 1])).toEqual(none(1));
    expect(sampleRatioMismatch([1, 2], [1])).toEqual(none(0));
    expect(sampleRatioMismatch([1, -2], [1, 1])).toEqual(none(0));
    expect(sampleRatioMismatch([1, 2], [1, Number.NaN])).toEqual(none(0));
  });
});

describe('always-valid mSPRT p-value', () => {
  it('matches the formula, lies in [0, 1], and is positive unless the evidence underflows', () => {
    fc.assert(
      fc.property(arm, arm, (t, c) => {
        const p = msprtPValue(t.x, t.n, c.x, c.n);
        expect(p >= 0 && p <= 1).toBe(true);
        const v = t.n > 0 && c.n > 0 ? (t.x / t.n) * (1 - t.x / t.n) / t.n + (c.x / c.n) * (1 - c.x / c.n) / c.n : 0;
        if (v === 0) {
          expect(p).toBe(1);
          return;
        }
        const log = oracleLogLambda(t.x, t.n, c.x, c.n);
        expect(close(p, Math.min(1, Math.exp(-log)), 1e-12, 1e-9)).toBe(true);
        if (log < 700) expect(p).toBeGreaterThan(0);
      }),
      { numRuns: 300 },
    );
  });

  it('is 1 for identical arms and for empty or degenerate data', () => {
    for (const n of [10, 1000, 1_000_000]) expect(msprtPValue(n / 10, n, n / 10, n)).toBe(1);
    expect(msprtPValue(0, 0, 0, 0)).toBe(1);
    expect(msprtPValue(5, 10, 0, 0)).toBe(1);
    expect(msprtPValue(0, 100, 0, 100)).toBe(1); // V = 0
    expect(msprtPValue(100, 100, 0, 100)).toBe(1); // V = 0 although the arms differ completely
    expect(msprtPValue(20, 100, 10, 100, 0)).toBe(1);
    expect(msprtPValue(11, 10, 1, 10)).toBe(1);
  });

  it('falls towards 0 as n grows with a fixed true difference (12% vs 10%)', () => {
    const ns = [1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6];
    const ps = ns.map((n) => msprtPValue(0.12 * n, n, 0.1 * n, n));
    for (let i = 1; i < ps.length; i++) expect(ps[i]).toBeLessThan(ps[i - 1]!);
    expect(ps[0]).toBeGreaterThan(0.5); // 1000 per arm: far from conclusive
    expect(ps[ps.length - 2]).toBeLessThan(1e-100);
    // Up to 3e5 per arm the value is representable: in (0, 1]. At 1e6 per arm log Λ ≈ 1020, so
    // 1/Λ ≈ e^−1020 is below the smallest double and is exactly 0 (not NaN, not negative).
    expect(ps.slice(0, -1).every((p) => p > 0 && p <= 1)).toBe(true);
    expect(oracleLogLambda(120_000, 1e6, 100_000, 1e6)).toBeGreaterThan(1000);
    expect(ps[ps.length - 1]).toBe(0);
  });

  it('nextAlwaysValidP is a running minimum', () => {
    fc.assert(
      fc.property(fc.array(fc.double({ min: 0, max: 1, noNaN: true })), (seq) => {
        let running = 1;
        for (const p of seq) {
          const next = nextAlwaysValidP(running, p);
          expect(next).toBeLessThanOrEqual(running);
          expect(next).toBe(Math.min(running, p));
          running = next;
        }
        expect(running).toBe(Math.min(1, ...seq));
      }),
    );
  });

  it('watching it continuously keeps false positives near α, unlike peeking at the fixed-horizon p', () => {
    // A/A simulation (both arms convert at 10%), 50 looks of 200 users per arm, seeded PRNG.
    let s = 0x2f6b3a1d;
    const rand = (): number => {
      s = (s + 0x6d2b79f5) | 0;
      let t = Math.imul(s ^ (s >>> 15), 1 | s);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const binomial = (n: number, p: number): number => {
      let k = 0;
      for (let i = 0; i < n; i++) if (rand() < p) k++;
      return k;
    };
    const runs = 300;
    let msprtHits = 0;
    let peekHits = 0;
    for (let r = 0; r < runs; r++) {
      let x1 = 0;
      let x0 = 0;
      let n = 0;
      let running = 1;
      let peeked = false;
      for (let look = 0; look < 50; look++) {
        x1 += binomial(200, 0.1);
        x0 += binomial(200, 0.1);
        n += 200;
        running = nextAlwaysValidP(running, msprtPValue(x1, n, x0, n));
        const fixed = twoProportionTest(x1, n, x0, n).pValue;
        if (fixed !== null && fixed < 0.05) peeked = true;
      }
      if (running < 0.05) msprtHits++;
      if (peeked) peekHits++;
    }
    expect(msprtHits / runs).toBeLessThanOrEqual(0.05);
    expect(peekHits / runs).toBeGreaterThan(0.15);
  });
});
