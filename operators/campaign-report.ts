import type { CampaignDef } from './campaign-rules.js';
import { CAMPAIGN_FIELDS, type CampaignField, type CampaignRow } from './campaigns.js';
import { msprtPValue, nextAlwaysValidP, sampleRatioMismatch, twoProportionTest, type SrmResult, type TwoProportionResult } from './campaign-stats.js';

/**
 * The campaign report (docs/CAMPAIGNS.md "Measuring"): per campaign and arm, the totals of the
 * daily rows, the conversion rate (converted / exposed, where exposed = sent, or control for the
 * holdout), and per variant against the holdout: absolute and relative uplift with 95 % intervals
 * and the two-proportion z-test p-value; per campaign a sample-ratio-mismatch check of the arm sizes
 * against the configured split; and an always-valid p-value (mixture SPRT) taken as the running
 * minimum over daily looks, which a live dashboard may watch without inflating false positives.
 */

export interface ArmReport {
  variant: string;
  totals: Record<CampaignField, number>;
  /** sent, or control for the holdout: the units the conversion rate is over. */
  exposed: number;
  conversionRate: number | null;
  /** Against the holdout (null for the holdout itself or without one). */
  vsControl: (TwoProportionResult & { alwaysValidP: number }) | null;
}

export interface CampaignReport {
  campaign: string;
  arms: ArmReport[];
  /** Follow-up steps cancelled and re-entries skipped are not per arm. */
  followupsCancelled: number;
  reentrySkipped: number;
  srm: SrmResult;
  /** Per local day: triggers (sent + control) and suppressions — what `simulate` prints. */
  days: { day: string; sent: number; control: number; suppressed: number; deferred: number }[];
}

const zero = (): Record<CampaignField, number> => Object.fromEntries(CAMPAIGN_FIELDS.map((f) => [f, 0])) as Record<CampaignField, number>;

export function campaignReport(rows: readonly CampaignRow[], defs: readonly CampaignDef[]): CampaignReport[] {
  return defs.map((def) => {
    const mine = rows.filter((r) => r.campaign === def.id);
    const control = def.experiment?.control ?? 0;
    const variants = def.experiment?.variants ?? [{ name: 'a', weight: 1 }];
    const armNames = [...variants.map((v) => v.name), ...(control > 0 ? ['control'] : [])];
    const totals = new Map(armNames.map((a) => [a, zero()]));
    const other = zero();
    const dayMap = new Map<string, { day: string; sent: number; control: number; suppressed: number; deferred: number }>();
    for (const r of mine) {
      const t = totals.get(r.variant) ?? other;
      for (const f of CAMPAIGN_FIELDS) t[f] += r.values[f];
      let d = dayMap.get(r.day);
      if (d === undefined) dayMap.set(r.day, (d = { day: r.day, sent: 0, control: 0, suppressed: 0, deferred: 0 }));
      d.sent += r.values.sent;
      d.control += r.values.control;
      d.suppressed += r.values.suppressed_cap + r.values.suppressed_channel + r.values.suppressed_consent;
      d.deferred += r.values.deferred_quiet_hours;
    }
    const exposedOf = (arm: string, v: Record<CampaignField, number>): number => (arm === 'control' ? v.control : v.sent);
    const days = [...dayMap.values()].sort((a, b) => (a.day < b.day ? -1 : 1));
    const c = totals.get('control');
    const arms: ArmReport[] = armNames.map((arm) => {
      const t = totals.get(arm)!;
      const exposed = exposedOf(arm, t);
      let vsControl: ArmReport['vsControl'] = null;
      if (arm !== 'control' && c !== undefined) {
        // Daily looks at the cumulative counts; the running minimum is the always-valid p-value.
        let p = 1;
        const cum = { x1: 0, n1: 0, x0: 0, n0: 0 };
        for (const d of days) {
          for (const r of mine) {
            if (r.day !== d.day) continue;
            if (r.variant === arm) {
              cum.x1 += r.values.converted;
              cum.n1 += r.values.sent;
            } else if (r.variant === 'control') {
              cum.x0 += r.values.converted;
              cum.n0 += r.values.control;
            }
          }
          p = nextAlwaysValidP(p, msprtPValue(cum.x1, cum.n1, cum.x0, cum.n0));
        }
        vsControl = { ...twoProportionTest(t.converted, exposed, c.converted, c.control), alwaysValidP: p };
      }
      return { variant: arm, totals: t, exposed, conversionRate: exposed > 0 ? t.converted / exposed : null, vsControl };
    });
    const total = variants.reduce((s, v) => s + v.weight, 0);
    const weights = [...variants.map((v) => ((1 - control) * v.weight) / total), ...(control > 0 ? [control] : [])];
    // SRM over eligible decisions (the assignment happens there, before suppressions).
    const srm = sampleRatioMismatch(armNames.map((a) => totals.get(a)!.eligible), weights);
    return { campaign: def.id, arms, followupsCancelled: other.followups_cancelled, reentrySkipped: other.reentry_skipped, srm, days };
  });
}
