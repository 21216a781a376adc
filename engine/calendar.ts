import { zoneOffsetMs } from './codec.js';

/**
 * Calendar windows in a time zone (SPEC §3): local day, ISO week (Monday first, weeks belong to the
 * year of their Thursday) and month, as integer indexes for hot code and as the labels of SPEC §9
 * (`2011-01-04`, `2011-W01`, `2011-01`) for output.
 *
 * Indexes count from the Unix epoch in local time: day 0 = 1970-01-01 (a Thursday), week 0 = the
 * ISO week that contains it (Monday 1969-12-29), month 0 = 1970-01. Turning an instant into local
 * time needs the zone's offset at that instant; offsets are cached per 15-minute bucket of UTC
 * time (every zone's transitions fall on quarter hours), so the hot path is one Map lookup.
 */

const DAY = 86_400_000;
const BUCKET = 15 * 60_000;
/** Cached buckets before the cache is dropped and refilled (bounded memory, ~10 years of buckets). */
const MAX_BUCKETS = 400_000;

export class Calendar {
  readonly timeZone: string;
  private readonly offsets = new Map<number, number>();

  constructor(timeZone: string) {
    this.timeZone = timeZone;
    zoneOffsetMs(timeZone, 0); // validates the zone once (CONFIG_INVALID), not per event
  }

  /** Offset of local time from UTC at instant `ts` (ms). */
  offset(ts: number): number {
    const bucket = Math.floor(ts / BUCKET);
    let off = this.offsets.get(bucket);
    if (off === undefined) {
      if (this.offsets.size >= MAX_BUCKETS) this.offsets.clear();
      off = zoneOffsetMs(this.timeZone, bucket * BUCKET);
      this.offsets.set(bucket, off);
    }
    return off;
  }

  /** Local day index of instant `ts`. */
  dayOf(ts: number): number {
    return Math.floor((ts + this.offset(ts)) / DAY);
  }

  /** ISO week index of a local day index. */
  weekOfDay(day: number): number {
    return Math.floor((day + 3) / 7);
  }

  /** Month index (months since 1970-01) of a local day index. */
  monthOfDay(day: number): number {
    return monthOfDay(day);
  }

  /**
   * The instant local day `day` starts: the first UTC ms whose local day is `day` (local midnight,
   * or the end of a transition gap where midnight does not exist, as in America/Santiago).
   * Binary search over ±16 h around the naive answer (every zone's offset is within ±14 h); used
   * for window bounds, not per event.
   */
  dayStart(day: number): number {
    let lo = day * DAY - 16 * 3_600_000;
    let hi = day * DAY + 16 * 3_600_000;
    while (lo < hi) {
      const mid = Math.floor((lo + hi) / 2);
      if (this.dayOf(mid) >= day) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** First local day of ISO week `week` (its Monday). */
  weekFirstDay(week: number): number {
    return week * 7 - 3;
  }

  /** First local day of month `month`. */
  monthFirstDay(month: number): number {
    return monthFirstDay(month);
  }

  dayLabel(day: number): string {
    return new Date(day * DAY).toISOString().slice(0, 10);
  }

  /** `YYYY-Www`: the ISO week-numbering year is the year of the week's Thursday. */
  weekLabel(week: number): string {
    const thursday = week * 7; // Monday (week*7 − 3) + 3
    const d = new Date(thursday * DAY);
    const year = d.getUTCFullYear();
    const jan1 = Math.round(Date.UTC(year, 0, 1) / DAY);
    const w = Math.floor((thursday - jan1) / 7) + 1;
    return `${year}-W${String(w).padStart(2, '0')}`;
  }

  monthLabel(month: number): string {
    const y = 1970 + Math.floor(month / 12);
    const m = ((month % 12) + 12) % 12;
    return `${y}-${String(m + 1).padStart(2, '0')}`;
  }
}

/**
 * Month index (months since 1970-01) of a day index, by integer arithmetic (H. Hinnant's
 * civil_from_days): KPI windows call this per contribution, so no Date is allocated.
 */
export function monthOfDay(day: number): number {
  const z = day + 719_468;
  const era = Math.floor(z / 146_097);
  const doe = z - era * 146_097;
  const yoe = Math.floor((doe - Math.floor(doe / 1460) + Math.floor(doe / 36_524) - Math.floor(doe / 146_096)) / 365);
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  const m = mp < 10 ? mp + 3 : mp - 9; // 1..12, the year starting in March
  const year = yoe + era * 400 + (m <= 2 ? 1 : 0);
  return (year - 1970) * 12 + m - 1;
}

/** First day index of month index `month` (days_from_civil). */
export function monthFirstDay(month: number): number {
  let y = 1970 + Math.floor(month / 12);
  const m = month - (y - 1970) * 12 + 1; // 1..12
  if (m <= 2) y -= 1;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * (m > 2 ? m - 3 : m + 9) + 2) / 5);
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146_097 + doe - 719_468;
}
