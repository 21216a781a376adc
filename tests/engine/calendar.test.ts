import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Calendar, monthFirstDay, monthOfDay } from '../../engine/calendar.js';

/**
 * The calendar against independent oracles: Intl's own local date of each instant (day and month
 * labels), and the ISO-8601 week rule written out the textbook way (week of the Thursday).
 */

const ZONES = ['Asia/Seoul', 'UTC', 'America/New_York', 'Europe/London', 'Australia/Lord_Howe', 'Asia/Kolkata', 'Pacific/Chatham', 'America/Santiago', 'Asia/Beirut'];

function localParts(tz: string, ts: number): { y: number; m: number; d: number } {
  const parts = new Intl.DateTimeFormat('en-US', { timeZone: tz, year: 'numeric', month: 'numeric', day: 'numeric' }).formatToParts(ts);
  const get = (t: string): number => Number(parts.find((p) => p.type === t)!.value);
  return { y: get('year'), m: get('month'), d: get('day') };
}

function isoWeekTextbook(y: number, m: number, d: number): string {
  // ISO 8601: week 1 holds the year's first Thursday; a date belongs to the week-year of its Thursday.
  const date = new Date(Date.UTC(y, m - 1, d));
  const dow = (date.getUTCDay() + 6) % 7; // Monday = 0
  date.setUTCDate(date.getUTCDate() - dow + 3); // that week's Thursday
  const wy = date.getUTCFullYear();
  const firstThursday = new Date(Date.UTC(wy, 0, 4));
  firstThursday.setUTCDate(firstThursday.getUTCDate() - ((firstThursday.getUTCDay() + 6) % 7) + 3);
  const week = 1 + Math.round((date.getTime() - firstThursday.getTime()) / (7 * 86_400_000));
  return `${wy}-W${String(week).padStart(2, '0')}`;
}

const pad = (n: number): string => String(n).padStart(2, '0');

describe('Calendar', () => {
  it('labels day, ISO week and month as the zone sees each instant', () => {
    const cals = new Map(ZONES.map((z) => [z, new Calendar(z)]));
    fc.assert(fc.property(
      fc.constantFrom(...ZONES),
      fc.integer({ min: Date.UTC(1995, 0, 1), max: Date.UTC(2040, 0, 1) }),
      (tz, ts) => {
        const cal = cals.get(tz)!;
        const { y, m, d } = localParts(tz, ts);
        const day = cal.dayOf(ts);
        expect(cal.dayLabel(day)).toBe(`${y}-${pad(m)}-${pad(d)}`);
        expect(cal.monthLabel(cal.monthOfDay(day))).toBe(`${y}-${pad(m)}`);
        expect(cal.weekLabel(cal.weekOfDay(day))).toBe(isoWeekTextbook(y, m, d));
        // The day's start is in the day, and one ms before it is the day before.
        const start = cal.dayStart(day);
        expect(start).toBeLessThanOrEqual(ts);
        expect(cal.dayOf(start)).toBe(day);
        expect(cal.dayOf(start - 1)).toBe(day - 1);
      },
    ), { numRuns: 3000 });
  });

  it('knows the SPEC §9 examples and the week-year edges', () => {
    const cal = new Calendar('Asia/Seoul');
    // 2011-01-04 00:30 in Seoul is still 2011-01-03 in UTC.
    const ts = Date.UTC(2011, 0, 3, 15, 30);
    expect(cal.dayLabel(cal.dayOf(ts))).toBe('2011-01-04');
    expect(cal.weekLabel(cal.weekOfDay(cal.dayOf(ts)))).toBe('2011-W01');
    expect(cal.monthLabel(cal.monthOfDay(cal.dayOf(ts)))).toBe('2011-01');
    const utc = new Calendar('UTC');
    const dayOf = (y: number, m: number, d: number): number => utc.dayOf(Date.UTC(y, m - 1, d));
    expect(utc.weekLabel(utc.weekOfDay(dayOf(2021, 1, 3)))).toBe('2020-W53');
    expect(utc.weekLabel(utc.weekOfDay(dayOf(2019, 12, 30)))).toBe('2020-W01');
    expect(utc.dayLabel(utc.weekFirstDay(utc.weekOfDay(dayOf(2024, 3, 14))))).toBe('2024-03-11');
    expect(utc.dayLabel(utc.monthFirstDay(utc.monthOfDay(dayOf(2024, 3, 14))))).toBe('2024-03-01');
    expect(() => new Calendar('Mars/Olympus')).toThrow(expect.objectContaining({ code: 'CONFIG_INVALID' }));
  });
});

describe('month arithmetic (no Date on the hot path)', () => {
  it('monthOfDay and monthFirstDay agree with Date for every day of 1900–2200', () => {
    const DAYMS = 86_400_000;
    for (let day = Math.round(Date.UTC(1900, 0, 1) / DAYMS); day < Date.UTC(2200, 0, 1) / DAYMS; day++) {
      const d = new Date(day * DAYMS);
      const month = (d.getUTCFullYear() - 1970) * 12 + d.getUTCMonth();
      if (monthOfDay(day) !== month) throw new Error(`monthOfDay(${day}) = ${monthOfDay(day)}, expected ${month}`);
      if (d.getUTCDate() === 1 && monthFirstDay(month) !== day) throw new Error(`monthFirstDay(${month}) = ${monthFirstDay(month)}, expected ${day}`);
    }
    expect(monthOfDay(0)).toBe(0);
  });
});
