/**
 * The output shapes of the KPI operator (SPEC §9 `export kpis|cohorts`, plus the funnel), shared by
 * the engine, the CLI exports and the DuckDB oracle tests. Definitions: docs/KPIS.md.
 */

export type KpiGrain = 'day' | 'week' | 'month';
export type CohortGrain = 'week' | 'month';
export type CohortKind = 'first_activity' | 'signup';

/** One (window, channel, platform) row; `"*"` = all values. Rates are null when undefined. */
export interface KpiRow {
  grain: KpiGrain;
  window: string;
  channel: string;
  platform: string;
  active_users: number;
  new_users: number;
  signups: number;
  signup_conversion: number | null;
  purchasers: number;
  orders: number;
  revenue: number;
  pcr: number | null;
  arppu: number | null;
  arpu: number | null;
  repeat_purchase_rate: number | null;
  first_purchasers: number;
  first_purchase_conversion: number | null;
  first_purchase_maturing: boolean;
  revisit_rate_d1_3: number | null;
  customers_start: number;
  customers_end: number;
  crr: number | null;
  cohort_retention: number | null;
  churn_rate: number | null;
  dormant_30: number;
  dormant_60: number;
  spend: number;
  cac: number | null;
  clv: number | null;
  active_users_7d: number | null;
  active_users_30d: number | null;
}

/** The KPI fields of a row in output order (everything after grain, window, channel, platform). */
export const KPI_FIELDS = [
  // SPEC §9, in its order…
  'active_users', 'new_users', 'signups', 'signup_conversion', 'purchasers', 'orders', 'revenue', 'pcr', 'arppu', 'arpu',
  'repeat_purchase_rate', 'first_purchasers', 'first_purchase_conversion', 'revisit_rate_d1_3', 'customers_start',
  'customers_end', 'crr', 'cohort_retention', 'churn_rate', 'spend', 'cac', 'clv',
  // …then the fields this implementation adds (SPEC §4 KPIs the §9 line does not list).
  'first_purchase_maturing', 'dormant_30', 'dormant_60', 'active_users_7d', 'active_users_30d',
] as const satisfies readonly (keyof KpiRow)[];

export interface CohortRow {
  grain: CohortGrain;
  cohort: string;
  size: number;
  age: number;
  active: number;
  purchasers: number;
  revenue: number;
  kind: CohortKind;
  channel: string;
  platform: string;
  cum_revenue_per_user: number;
}

/** Cohort row fields in output order: SPEC §9's, then the added ones. */
export const COHORT_FIELDS = ['grain', 'cohort', 'size', 'age', 'active', 'purchasers', 'revenue', 'kind', 'channel', 'platform', 'cum_revenue_per_user'] as const satisfies readonly (keyof CohortRow)[];

export interface FunnelRow {
  grain: KpiGrain;
  cohort: string;
  channel: string;
  platform: string;
  visit: number;
  sign_up: number;
  first_purchase: number;
  revisit: number;
  repeat_purchase: number;
  sign_up_rate: number | null;
  first_purchase_rate: number | null;
  revisit_rate: number | null;
  repeat_purchase_rate: number | null;
}
