import chisquareCdf from '@stdlib/stats-base-dists-chisquare-cdf';
import normalCdf from '@stdlib/stats-base-dists-normal-cdf';
import normalQuantile from '@stdlib/stats-base-dists-normal-quantile';

/**
 * Statistics for campaign experiments (treatment vs control arms): the fixed-horizon
 * two-proportion test a report prints once the planned sample is reached, the sample-ratio
 * mismatch check that says whether the assignment itself can be trusted, and an always-valid
 * (mixture SPRT) p-value a live dashboard can be watched continuously.
 *
 * All functions are pure and never throw: dashboards call them on whatever counts the stream has
 * produced so far, including empty arms. A quantity the data cannot define is `null`, never NaN,
 * Infinity or a made-up 0, so a UI can show "—" instead of a misleading number. Every result has
 * the same fields whatever the input, so results can be compared, serialised and diffed as rows.
 *
 * Distribution functions come from @stdlib (not hand-written), so their tail accuracy is not our
 * problem to maintain.
 */

export interface TwoProportionResult {
  /** Treatment conversion rate x1/n1; null when n1 = 0. */
  p1: number | null;
  /** Control conversion rate x0/n0; null when n0 = 0. */
  p0: number | null;
  /** Absolute uplift p1 − p0; null unless both rates exist. */
  diff: number | null;
  /** Unpooled Wald interval for `diff`; null when its standard error is 0 (see below). */
  diffLow: number | null;
  diffHigh: number | null;
  /** Relative uplift p1/p0 − 1; null when p0 is 0 or missing (a ratio to nothing is undefined). */
  relUplift: number | null;
  /** Delta-method interval on log(p1/p0); null when either arm has 0 conversions. */
  relLow: number | null;
  relHigh: number | null;
  /** Pooled two-proportion z statistic; null when the pooled variance is 0. */
  z: number | null;
  /** Two-sided p-value 2·(1 − Φ(|z|)); null exactly when `z` is. */
  pValue: number | null;
}

const NO_TEST: TwoProportionResult = {
  p1: null, p0: null, diff: null, diffLow: null, diffHigh: null,
  relUplift: null, relLow: null, relHigh: null, z: null, pValue: null,
};

/** A count pair that can be conversions of trials: finite, 0 ≤ x ≤ n. */
function validCounts(x: number, n: number): boolean {
  return Number.isFinite(x) && Number.isFinite(n) && x >= 0 && n >= 0 && x <= n;
}

/**
 * Two-sided critical value z_{1−α/2} for a confidence level, or null for a level that is not in
 * (0, 1): an interval "at 100%" or "at 0%" does not exist, so there is no number to show.
 */
function criticalValue(confidence: number): number | null {
  if (!(confidence > 0 && confidence < 1)) return null;
  return normalQuantile(1 - (1 - confidence) / 2, 0, 1);
}

/**
 * Treatment (x1 conversions of n1) vs control (x0 of n0).
 *
 * - The test uses the *pooled* variance because under the null hypothesis (p1 = p0) both arms
 *   estimate the same rate; this is the textbook two-proportion z-test and matches what analysts
 *   get from R's prop.test without continuity correction (z² = X²).
 * - The interval for `diff` uses the *unpooled* (Wald) variance because away from the null the
 *   arms have different rates. Consequently the test and the interval can, near the boundary,
 *   disagree on "significant": that is inherent to the two standard methods, not a bug.
 * - The relative interval is built on log(p1/p0) (delta method) and mapped back, so it is
 *   asymmetric and never crosses −100%, as a ratio interval should.
 *
 * Edge cases (why each is null rather than a number):
 * - n1 = 0 or n0 = 0: that arm has no rate; everything depending on it is null. Counts that
 *   cannot be counts (negative, x > n, non-finite) are treated as no data: all fields null.
 * - Pooled variance 0 (both arms 0% or both 100%): there is no variation to test against, so z
 *   and pValue are null. Reporting z = 0 / p = 1 would look like evidence of "no effect".
 * - Unpooled variance 0 (each arm at 0% or 100%): the Wald interval would have zero width and
 *   claim certainty from degenerate data, so diffLow/diffHigh are null.
 * - p0 = 0: relative uplift is a division by zero, so relUplift and its interval are null.
 * - x1 = 0 with x0 > 0: relUplift is exactly −1 (well defined), but log(0) has no delta-method
 *   interval, so relLow/relHigh are null. Likewise when x0 = 0.
 * - `confidence` outside (0, 1): intervals are null; point estimates and the test still appear.
 */
export function twoProportionTest(x1: number, n1: number, x0: number, n0: number, confidence = 0.95): TwoProportionResult {
  if (!validCounts(x1, n1) || !validCounts(x0, n0)) return { ...NO_TEST };
  const p1 = n1 > 0 ? x1 / n1 : null;
  const p0 = n0 > 0 ? x0 / n0 : null;
  if (p1 === null || p0 === null) return { ...NO_TEST, p1, p0 };

  const diff = p1 - p0;
  const crit = criticalValue(confidence);

  let diffLow: number | null = null;
  let diffHigh: number | null = null;
  const seDiff = Math.sqrt((p1 * (1 - p1)) / n1 + (p0 * (1 - p0)) / n0);
  if (crit !== null && seDiff > 0) {
    diffLow = diff - crit * seDiff;
    diffHigh = diff + crit * seDiff;
  }

  let relUplift: number | null = null;
  let relLow: number | null = null;
  let relHigh: number | null = null;
  if (p0 > 0) {
    relUplift = p1 / p0 - 1;
    if (x1 > 0 && crit !== null) {
      // x0 > 0 follows from p0 > 0. seLog is 0 only when both arms are at 100%: zero width would
      // claim certainty, as for the Wald interval, so it is null too.
      const seLog = Math.sqrt((1 - p1) / x1 + (1 - p0) / x0);
      if (seLog > 0) {
        const logRatio = Math.log(p1 / p0);
        relLow = Math.exp(logRatio - crit * seLog) - 1;
        relHigh = Math.exp(logRatio + crit * seLog) - 1;
      }
    }
  }

  let z: number | null = null;
  let pValue: number | null = null;
  const pp = (x1 + x0) / (n1 + n0);
  const pooledVar = pp * (1 - pp) * (1 / n1 + 1 / n0);
  if (pooledVar > 0) {
    z = diff / Math.sqrt(pooledVar);
    // 2·Φ(−|z|) rather than 2·(1 − Φ(|z|)): the same value, without cancellation in the tail.
    pValue = Math.min(1, 2 * normalCdf(-Math.abs(z), 0, 1));
  }

  return { p1, p0, diff, diffLow, diffHigh, relUplift, relLow, relHigh, z, pValue };
}

export interface SrmResult {
  /** Pearson's Σ (O − E)² / E over the arms with positive weight; null when the test is undefined. */
  chi2: number | null;
  /** Degrees of freedom: arms with positive weight − 1 (0 when fewer than 2 such arms). */
  df: number;
  /** P(χ²_df ≥ chi2); null when the test is undefined. */
  pValue: number | null;
  /** pValue < alpha; false whenever pValue is null (no evidence is not evidence of a mismatch). */
  mismatch: boolean;
}

/**
 * Sample-ratio mismatch: are the observed arm sizes consistent with the configured split?
 * A mismatch means assignment or logging is broken, and then every uplift number is suspect,
 * whatever its p-value; that is why dashboards show this check before the results.
 *
 * - `weights` are relative (e.g. [1, 1] or [90, 10]); they need not sum to 1.
 * - Arms with weight 0 are excluded: their expected count is 0, so Pearson's term is undefined
 *   (a paused arm that still receives traffic is a configuration bug this test cannot express).
 * - `alpha` defaults to 0.001, the customary SRM threshold: the check runs on every experiment
 *   continuously, so a stricter level keeps false alarms rare, and real SRMs are usually gross.
 * - Undefined cases (fewer than 2 weighted arms, no observations in them, lengths that differ,
 *   negative or non-finite entries) give chi2 = pValue = null and mismatch = false.
 */
export function sampleRatioMismatch(counts: readonly number[], weights: readonly number[], alpha = 0.001): SrmResult {
  const undefinedTest = (df: number): SrmResult => ({ chi2: null, df, pValue: null, mismatch: false });
  if (counts.length !== weights.length) return undefinedTest(0);
  const arms: { count: number; weight: number }[] = [];
  for (let i = 0; i < counts.length; i++) {
    const count = counts[i]!;
    const weight = weights[i]!;
    if (!Number.isFinite(count) || !Number.isFinite(weight) || count < 0 || weight < 0) return undefinedTest(0);
    if (weight > 0) arms.push({ count, weight });
  }
  const df = Math.max(0, arms.length - 1);
  const total = arms.reduce((s, a) => s + a.count, 0);
  const weightSum = arms.reduce((s, a) => s + a.weight, 0);
  if (arms.length < 2 || total <= 0) return undefinedTest(df);

  let chi2 = 0;
  for (const a of arms) {
    const expected = (total * a.weight) / weightSum;
    chi2 += (a.count - expected) ** 2 / expected;
  }
  const pValue = Math.min(1, Math.max(0, 1 - chisquareCdf(chi2, df)));
  return { chi2, df, pValue, mismatch: pValue < alpha };
}

/**
 * Always-valid p-value bound of the mixture sequential probability ratio test (mSPRT; Johari,
 * Pekelis & Walsh, "Always valid inference", 2017) for the difference of two proportions, using
 * the normal approximation θ̂ = p1 − p0 ~ N(θ, V), V = p1(1−p1)/n1 + p0(1−p0)/n0, and a N(0, τ²)
 * mixture over the effect θ:
 *
 *   Λ = sqrt(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²))),   p = min(1, 1/Λ).
 *
 * Why: a fixed-horizon p-value checked every refresh of a live dashboard inflates false positives
 * far beyond α (each peek is another chance to cross the line). Under the null, Λ is a
 * nonnegative martingale, so by Ville's inequality P(sup_t Λ_t ≥ 1/α) ≤ α: stopping whenever the
 * running minimum of this value falls below α keeps the error rate at α.
 *
 * This is the *instantaneous* value at the current counts; the always-valid p-value is its running
 * minimum over time, which the caller keeps (see `nextAlwaysValidP`).
 *
 * `tau2` is the prior variance of the effect on the absolute scale (default 1e-4, i.e. effects of
 * about ±1 percentage point): the test is most powerful for effects of roughly that size. It must
 * stay fixed for the life of an experiment, or the running minimum loses its guarantee.
 *
 * Returns 1 (no evidence) when an arm is empty, V = 0 (nothing to measure variation with), tau2 is
 * not positive, or the counts are invalid. Λ is evaluated in log space so large samples neither
 * overflow nor give NaN; overwhelming evidence can underflow to exactly 0.
 */
export function msprtPValue(x1: number, n1: number, x0: number, n0: number, tau2 = 0.0001): number {
  if (!validCounts(x1, n1) || !validCounts(x0, n0) || n1 === 0 || n0 === 0) return 1;
  if (!(tau2 > 0 && Number.isFinite(tau2))) return 1;
  const p1 = x1 / n1;
  const p0 = x0 / n0;
  const v = (p1 * (1 - p1)) / n1 + (p0 * (1 - p0)) / n0;
  if (!(v > 0)) return 1;
  const theta = p1 - p0;
  const logLambda = 0.5 * Math.log(v / (v + tau2)) + (theta * theta * tau2) / (2 * v * (v + tau2));
  return Math.min(1, Math.exp(-logLambda));
}

/**
 * One step of the always-valid p-value: min(previous, current). The always-valid p-value at time t
 * is the minimum of `msprtPValue` over all looks up to t, so the caller stores it per experiment,
 * starts it at 1, and folds each new instantaneous value in. It never increases: once evidence has
 * been seen it is not "unseen" by later noise, and that is exactly what makes stopping at any look
 * valid. (Taking the current value alone would not be always valid.)
 */
export function nextAlwaysValidP(previous: number, current: number): number {
  return Math.min(previous, current);
}
