import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  type ColumnMap, type CsvAppender, createCsvAppender, defaultColumnMap, parseMap, readCsvFile, readMapFile,
} from '../../../engine/sources/csv.js';
import { EventColumns } from '../../../engine/batch.js';
import { resolveConfig } from '../../../engine/config.js';
import { CrmError } from '../../../engine/errors.js';
import { EventType, Reject, rejectName, TypeRegistry } from '../../../engine/event-types.js';
import { validateStatic } from '../../../engine/validate.js';

const PROJECT_ROOT = path.resolve(import.meta.dirname, '../../..');
const DATA = path.resolve(PROJECT_ROOT, '../shared/data');
const REES46 = path.join(DATA, 'rees46_oct2019_head/2019-Oct_head.csv');
const CDNOW = path.join(DATA, 'cdnow/CDNOW_master.txt');
const CDNOW_SAMPLE = path.join(DATA, 'cdnow/CDNOW_sample.txt');
const HAS_DATA = existsSync(REES46) && existsSync(CDNOW);
const SKIP_NOTE = HAS_DATA ? '' : ` (skipped: ${DATA} is absent)`;

const tmp = mkdtempSync(path.join(os.tmpdir(), 'crm-csv-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let fileSeq = 0;
function tmpFile(content: string | Buffer, name = `f${++fileSeq}.csv`): string {
  const p = path.join(tmp, name);
  writeFileSync(p, content);
  return p;
}

function mapError(json: unknown): CrmError {
  try {
    parseMap(json);
  } catch (err) {
    if (err instanceof CrmError) return err;
    throw err;
  }
  throw new Error('expected parseMap to throw');
}

async function rejects(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected a rejection');
}

const MIN = { event_id: { generate: 'line' }, type: { const: 'purchase' }, ts: 'date' };

describe('parseMap', () => {
  it('normalises every source form', () => {
    const m = parseMap({
      $comment: ['notes'],
      event_id: { generate: 'line' },
      ts: 'event_time',
      type: { column: 'event_type', values: { view: 'page_view' } },
      user_id: 'uid',
      currency: { const: 'KRW' },
      amount: { column: 'price' },
      props: { session: 'user_session', src: { const: 'rees46' } },
      _csv: { delimiter: ';' },
    });
    expect(m.fields.event_id).toMatchObject({ kind: 'generate' });
    expect(m.fields.ts).toMatchObject({ kind: 'column', column: 'event_time', values: null });
    expect(m.fields.type?.kind).toBe('column');
    expect(m.fields.type?.values?.get('view')).toBe('page_view');
    expect(m.fields.currency).toMatchObject({ kind: 'const', value: 'KRW' });
    expect(m.fields.amount).toMatchObject({ kind: 'column', column: 'price' });
    expect(m.fields.anonymous_id).toBeUndefined();
    expect(Object.keys(m.props)).toEqual(['session', 'src']);
    expect(m.csv).toEqual({ delimiter: ';', header: true, columns: null });
    expect(Object.isFrozen(m)).toBe(true);
  });

  it('defaults _csv to comma-separated with a header', () => {
    expect(parseMap(MIN).csv).toEqual({ delimiter: ',', header: true, columns: null });
  });

  it('rejects malformed maps with SOURCE_MAP_INVALID naming the offending path', () => {
    const cases: [unknown, string][] = [
      [null, '(map)'],
      [[], '(map)'],
      ['ts', '(map)'],
      [{ ...MIN, usr_id: 'x' }, 'usr_id'],
      [{ type: 't', ts: 'd' }, 'event_id'],
      [{ event_id: 'id', ts: 'd' }, 'type'],
      [{ event_id: 'id', type: 't' }, 'ts'],
      [{ ...MIN, user_id: '' }, 'user_id'],
      [{ ...MIN, user_id: 5 }, 'user_id'],
      [{ ...MIN, user_id: { generate: 'line' } }, 'user_id'],
      [{ ...MIN, event_id: { generate: 'uuid' } }, 'event_id.generate'],
      [{ ...MIN, currency: { const: 5 } }, 'currency.const'],
      [{ ...MIN, currency: { const: 'KRW', extra: 1 } }, 'currency'],
      [{ ...MIN, type: { column: 'event_type', values: { view: 1 } } }, 'type.values.view'],
      [{ ...MIN, type: { column: '' } }, 'type.column'],
      [{ ...MIN, type: { values: {} } }, 'type'],
      [{ ...MIN, props: 'x' }, 'props'],
      [{ ...MIN, props: { p: 7 } }, 'props.p'],
      [{ ...MIN, props: { p: { generate: 'line' } } }, 'props.p'],
      [{ ...MIN, _csv: { delimiter: ' ' } }, '_csv.delimiter'],
      [{ ...MIN, _csv: { header: 'yes' } }, '_csv.header'],
      [{ ...MIN, _csv: { header: false } }, '_csv.columns'],
      [{ ...MIN, _csv: { header: true, columns: ['a'] } }, '_csv.columns'],
      [{ ...MIN, _csv: { quote: "'" } }, '_csv.quote'],
    ];
    for (const [json, where] of cases) {
      const err = mapError(json);
      expect(err.code, JSON.stringify(json)).toBe('SOURCE_MAP_INVALID');
      expect(err.message, JSON.stringify(json)).toContain(`${where}:`);
    }
  });

  it('lists every problem at once', () => {
    const err = mapError({ type: 5, ts: '' });
    expect(err.message).toContain('event_id:');
    expect(err.message).toContain('type:');
    expect(err.message).toContain('ts:');
  });

  it('the example maps are valid', async () => {
    const rees = await readMapFile(path.join(PROJECT_ROOT, 'examples/maps/rees46.json'));
    expect(rees.fields.type?.values?.get('cart')).toBe('add_to_cart');
    const cdnow = await readMapFile(path.join(PROJECT_ROOT, 'examples/maps/cdnow.json'));
    expect(cdnow.csv.delimiter).toBe('whitespace');
  });

  it('readMapFile: unreadable file is SOURCE_IO, bad JSON is SOURCE_MAP_INVALID', async () => {
    expect((await rejects(readMapFile(path.join(tmp, 'nope.json'))) as CrmError).code).toBe('SOURCE_IO');
    expect((await rejects(readMapFile(tmpFile('{ "ts": ', 'bad.json'))) as CrmError).code).toBe('SOURCE_MAP_INVALID');
    expect((await rejects(readMapFile(tmpFile('{"ts": "x"}', 'incomplete.json'))) as CrmError).code).toBe('SOURCE_MAP_INVALID');
  });
});

describe('createCsvAppender', () => {
  const TZ = 'Asia/Seoul';
  const header = ['when', 'kind', 'who', 'price', 'sku', 'note'];
  const map = parseMap({
    event_id: { generate: 'line' },
    ts: 'when',
    type: { column: 'kind', values: { view: 'page_view', cart: 'add_to_cart' } },
    user_id: 'who',
    amount: 'price',
    channel: { const: 'organic' },
    props: { sku: 'sku', note: 'note', source: { const: 'import' }, kind: { column: 'kind', values: { view: 'V' } } },
  });

  function appendAll(m: ColumnMap | null, hdr: string[], records: string[][], source = 'in.csv'): EventColumns {
    const b = new EventColumns(records.length);
    const append = createCsvAppender(m, hdr, TZ, source);
    records.forEach((r, k) => append(b, r, k + 2));
    return b;
  }

  it('maps columns, constants, translations, generated ids and props', () => {
    const b = appendAll(map, header, [
      ['2019-10-01 09:00:00', 'view', 'u1', '35.79', 'P1', ''],
      ['2019-10-01T00:00:00Z', 'remove_from_cart', 'u2', '', '', 'gift'],
    ]);
    expect(b.status[0]).toBe(Reject.ok);
    expect(b.eventId[0]).toBe('in.csv:2');
    expect(b.origin[0]).toBe('in.csv:2');
    expect(b.type[0]).toBe('page_view');
    expect(b.userId[0]).toBe('u1');
    expect(b.ts[0]).toBe(Date.UTC(2019, 9, 1));
    expect(b.amount[0]).toBe(35.79);
    expect(b.channel[0]).toBe('organic');
    expect(b.props[0]).toEqual({ sku: 'P1', source: 'import', kind: 'V' }); // empty note: no entry
    expect(b.raw[0]).toBe('2019-10-01 09:00:00,view,u1,35.79,P1,');
    expect(b.size[0]).toBe(Buffer.byteLength(b.raw[0] as string));
    expect(b.type[1]).toBe('remove_from_cart'); // not in `values`: passes through
    expect(b.amount[1]).toBeNaN(); // empty cell: absent
    expect(b.eventId[1]).toBe('in.csv:3');
  });

  it('unparseable ts / amount reject the row, keeping the other fields', () => {
    const b = appendAll(map, header, [
      ['01/10/2019', 'view', 'u1', '1', 'P', ''],
      ['2019-10-01', 'cart', 'u2', '1,234', 'P', ''],
      ['2019-10-01', 'cart', 'u3', '0x10', 'P', ''],
    ]);
    expect(Array.from(b.status)).toEqual([Reject.bad_timestamp, Reject.bad_amount, Reject.bad_amount]);
    expect(b.detail[0]).toContain('when');
    expect(b.detail[1]).toContain('price');
    expect(b.userId.slice(0, 3)).toEqual(['u1', 'u2', 'u3']);
    expect(b.type[1]).toBe('add_to_cart');
  });

  it('a record with the wrong number of fields, or a parser error, is bad_encoding', () => {
    const b = new EventColumns(3);
    const append = createCsvAppender(map, header, TZ, 'in.csv');
    append(b, ['2019-10-01', 'view'], 5);
    append(b, ['2019-10-01', 'view', 'u', '1', 'P', '', 'extra'], 6, 'the raw line');
    append(b, [], 7, '"unterminated', 'CSV: quote not closed');
    expect(Array.from(b.status)).toEqual([Reject.bad_encoding, Reject.bad_encoding, Reject.bad_encoding]);
    expect(b.raw[0]).toBe('2019-10-01,view');
    expect(b.raw[1]).toBe('the raw line');
    expect(b.detail[2]).toBe('CSV: quote not closed');
    expect(b.origin[2]).toBe('in.csv:7');
  });

  it('a map naming a column the header lacks is SOURCE_MAP_INVALID (all of them listed)', () => {
    let err: unknown;
    try {
      createCsvAppender(map, ['when', 'kind'], TZ, 'x.csv');
    } catch (e) {
      err = e;
    }
    expect((err as CrmError).code).toBe('SOURCE_MAP_INVALID');
    expect((err as CrmError).message).toContain('"who"');
    expect((err as CrmError).message).toContain('"sku"');
  });

  it('an unknown zone is CONFIG_INVALID at creation, not per row', () => {
    expect(() => createCsvAppender(map, header, 'Nowhere/Land', 'x')).toThrow(CrmError);
    try {
      createCsvAppender(map, header, 'Nowhere/Land', 'x');
    } catch (e) {
      expect((e as CrmError).code).toBe('CONFIG_INVALID');
    }
  });

  it('without a map: columns named as fields, the rest become props', () => {
    const hdr = ['event_id', 'type', 'user_id', 'ts', 'amount', 'currency', 'coupon', '__proto__'];
    const b = appendAll(null, hdr, [['e1', 'purchase', 'u1', '1569888000000', '12', 'KRW', 'WELCOME', 'p']]);
    expect(b.status[0]).toBe(Reject.ok);
    expect(b.eventId[0]).toBe('e1');
    expect(b.ts[0]).toBe(1_569_888_000_000);
    expect(b.amount[0]).toBe(12);
    expect(b.currency[0]).toBe('KRW');
    const p = b.props[0] as Record<string, string>;
    expect(Object.getPrototypeOf(p)).toBe(Object.prototype);
    expect(Object.entries(p)).toEqual([['coupon', 'WELCOME'], ['__proto__', 'p']]);
  });

  it('without a map, a header lacking event_id/type/ts is SOURCE_MAP_INVALID', () => {
    expect(() => defaultColumnMap(['type', 'ts', 'user_id'])).toThrow(CrmError);
    try {
      defaultColumnMap(['user_id']);
    } catch (e) {
      expect((e as CrmError).code).toBe('SOURCE_MAP_INVALID');
      expect((e as CrmError).message).toContain('event_id, type, ts');
    }
  });
});

/** Reads a file into rows via readCsvFile + createCsvAppender, the way backfill does. */
async function load(file: string, map: ColumnMap | null, tz = 'Asia/Seoul', capacity = 1 << 17) {
  const b = new EventColumns(capacity);
  let append: CsvAppender | null = null;
  const headers: (readonly string[])[] = [];
  const stats = await readCsvFile(file, map, (record, lineNo, header, raw, error) => {
    if (append === null) headers.push(header);
    append ??= createCsvAppender(map, header, tz, path.basename(file));
    append(b, record, lineNo, raw, error);
  });
  return { b, stats, header: headers[0] };
}

describe('readCsvFile', () => {
  const M = parseMap({ event_id: 'id', type: 'type', user_id: 'user', ts: 'ts', amount: 'amount', props: { note: 'note' } });

  it('handles quotes, embedded newlines and delimiters, CRLF, a BOM and blank lines', async () => {
    const text = '\uFEFFid,type,user,ts,amount,note\r\n'
      + 'e1,visit,u1,1569888000000,,"hello, world"\r\n'
      + '\r\n'
      + 'e2,purchase,u2,1569888000001,10.5,"two\r\nlines"\r\n'
      + 'e3,visit,"u""3",1569888000002,,\r\n';
    const { b, stats, header } = await load(tmpFile(text), M);
    expect(header).toEqual(['id', 'type', 'user', 'ts', 'amount', 'note']);
    expect(b.length).toBe(3);
    expect(Array.from(b.status.subarray(0, 3))).toEqual([0, 0, 0]);
    expect(b.props[0]).toEqual({ note: 'hello, world' });
    expect(b.props[1]).toEqual({ note: 'two\r\nlines' });
    expect(b.userId[2]).toBe('u"3');
    expect(b.origin.slice(0, 3)).toEqual([`f${fileSeq}.csv:2`, `f${fileSeq}.csv:4`, `f${fileSeq}.csv:6`]); // start lines
    expect(b.raw[0]).toBe('e1,visit,u1,1569888000000,,"hello, world"');
    expect(stats.records).toBe(3);
    expect(stats.malformed).toBe(0);
  });

  it('delivers unreadable and ragged records as bad_encoding rows, in file order, and reads on', async () => {
    const text = 'id,type,user,ts,amount,note\n'
      + 'e1,visit,u1,1569888000000,,5" screen\n' // a stray quote in an unquoted field is literal text
      + 'e2,visit,u2\n'
      + 'e3,visit,u3,1569888000000,,d\n'
      + 'e4,visit,u4,1569888000000,,"never closed\n'
      + 'e5,visit,u5,1569888000000,,e\n';
    const { b, stats } = await load(tmpFile(text), M);
    expect(b.length).toBe(4);
    expect(Array.from(b.status.subarray(0, 4))).toEqual([Reject.ok, Reject.bad_encoding, Reject.ok, Reject.bad_encoding]);
    expect(b.props[0]).toEqual({ note: '5" screen' });
    expect(b.eventId[2]).toBe('e3');
    expect(b.detail[1]).toBe('expected 6 fields, got 3');
    expect(b.origin[1]).toMatch(/:3$/);
    // the unclosed quote runs to the end of the file: one unreadable record, starting at line 5
    expect(b.origin[3]).toMatch(/:5$/);
    expect(b.raw[3]).toContain('never closed');
    expect(b.raw[3]).toContain('e5');
    expect(b.detail[3]).toMatch(/^CSV: /);
    expect(stats.records).toBe(4);
    expect(stats.malformed).toBe(1);
  });

  it('numbers records by the line they start on, whatever the line endings inside quotes', async () => {
    const text = 'id,type,user,ts,amount,note\r\n'
      + 'e1,visit,u1,1,,"a\r\nb\r\nc"\r\n' // lines 2-4
      + 'e2,visit,u2,1,,"x\ny"\r\n' // lines 5-6
      + '\r\n' // 7
      + 'e3,visit,u3,1,,"p\rq"\r\n' // 8-9
      + 'e4,visit,u4,1,,plain\r\n' // 10
      + 'e5,visit,u5,1,,"open\r\n\r\nto the end\r\n'; // 11-: unreadable
    const { b } = await load(tmpFile(text), M);
    expect(b.origin.slice(0, 5).map((o) => Number(o.split(':')[1]))).toEqual([2, 5, 8, 10, 11]);
    expect(b.status[4]).toBe(Reject.bad_encoding);
  });

  it('a record beyond maxRecordChars (a runaway quote) fails the file with SOURCE_DECODE instead of buffering it', async () => {
    let text = 'id,type,user,ts,amount,note\ne1,visit,u1,1,,"oops\n';
    for (let k = 2; k < 500; k++) text += `e${k},visit,u,1,,x\n`;
    const seen: string[] = [];
    const err = await rejects(readCsvFile(tmpFile(text), M, (record) => {
      seen.push(record[0] as string);
    }, { maxRecordChars: 1000 }));
    expect((err as CrmError).code).toBe('SOURCE_DECODE');
    expect(seen).toEqual([]);
  });

  it('reads ";" and tab delimited files', async () => {
    const semi = parseMap({ ...MIN, user_id: 'u', _csv: { delimiter: ';' } });
    const r1 = await load(tmpFile('date;u\n2019-10-01;a\n'), semi);
    expect(r1.b.userId[0]).toBe('a');
    const tab = parseMap({ ...MIN, user_id: 'u', _csv: { delimiter: '\t' } });
    const r2 = await load(tmpFile('date\tu\n2019-10-01\ta b\n'), tab);
    expect(r2.b.userId[0]).toBe('a b');
  });

  it('reads whitespace-separated text without a header, using _csv.columns', async () => {
    const m = parseMap({
      ...MIN, user_id: 'cust', amount: 'dollars', _csv: { delimiter: 'whitespace', header: false, columns: ['cust', 'date', 'dollars'] },
    });
    const { b, stats } = await load(tmpFile('  00001  19970101   11.77\r\n\r\n\t00002 19970112 12.00\r\n 00003 19970102 5'), m, 'UTC');
    expect(b.length).toBe(3);
    expect(b.userId.slice(0, 3)).toEqual(['00001', '00002', '00003']);
    expect(Array.from(b.ts.subarray(0, 3))).toEqual([Date.UTC(1997, 0, 1), Date.UTC(1997, 0, 12), Date.UTC(1997, 0, 2)]);
    expect(b.origin[1]).toMatch(/:3$/); // the blank line counts
    expect(b.raw[0]).toBe('00001  19970101   11.77');
    expect(stats.lines).toBe(4);
  });

  it('pauses while the handler\'s promise is pending (bounded memory, batch-boundary await)', async () => {
    for (const [delimiter, sep] of [[',', ','], ['whitespace', ' ']] as const) {
      const lines = ['date,u'.replace(',', sep)];
      for (let k = 0; k < 20_000; k++) lines.push(`2019-10-01${sep}user${k}`);
      const file = tmpFile(`${lines.join('\n')}\n`);
      const m = parseMap({ ...MIN, user_id: 'u', _csv: { delimiter } });
      const batch = new EventColumns(1000);
      let append: CsvAppender | null = null;
      const seen: string[] = [];
      let inFlight = false;
      let calledDuringFlush = 0;
      const stats = await readCsvFile(file, m, (record, lineNo, header, raw, error) => {
        if (inFlight) calledDuringFlush++; // must never happen while a flush is pending
        append ??= createCsvAppender(m, header, 'UTC', 'x');
        append(batch, record, lineNo, raw, error);
        if (!batch.full) return undefined;
        inFlight = true;
        return new Promise<void>((resolve) => setTimeout(() => {
          for (let i = 0; i < batch.length; i++) seen.push(batch.userId[i] as string);
          batch.reset();
          inFlight = false;
          resolve();
        }, 1));
      });
      for (let i = 0; i < batch.length; i++) seen.push(batch.userId[i] as string);
      expect(calledDuringFlush).toBe(0);
      expect(stats.records).toBe(20_000);
      expect(seen.length).toBe(20_000);
      expect(seen[0]).toBe('user0');
      expect(seen[19_999]).toBe('user19999');
    }
  });

  it('an empty file yields no records and no header', async () => {
    const { b, stats, header } = await load(tmpFile(''), M);
    expect(b.length).toBe(0);
    expect(stats.records).toBe(0);
    expect(header).toBeUndefined();
  });

  it('a missing file is SOURCE_IO; a handler error stops reading and is passed on', async () => {
    expect((await rejects(readCsvFile(path.join(tmp, 'missing.csv'), M, () => undefined)) as CrmError).code).toBe('SOURCE_IO');
    const boom = new Error('boom');
    const file = tmpFile('id,type,user,ts,amount,note\ne1,v,u,1,,\ne2,v,u,1,,\n');
    expect(await rejects(readCsvFile(file, M, () => { throw boom; }))).toBe(boom);
    expect(await rejects(readCsvFile(file, M, () => Promise.reject(boom)))).toBe(boom);
    const ws = parseMap({ ...MIN, _csv: { delimiter: 'whitespace' } });
    expect(await rejects(readCsvFile(tmpFile('date\n19970101\n'), ws, () => { throw boom; }))).toBe(boom);
  });

  it('an unreadable header row is SOURCE_DECODE', async () => {
    const err = await rejects(load(tmpFile('"id,type\ne1,v\n'), M));
    expect((err as CrmError).code).toBe('SOURCE_DECODE');
  });
});

describe('real data with the example maps', () => {
  const cfgUsd = resolveConfig({ validation: { currency: 'USD' } });

  function rejectCounts(b: EventColumns): Record<string, number> {
    const out: Record<string, number> = {};
    for (let i = 0; i < b.length; i++) {
      if (b.status[i] !== Reject.ok) {
        const k = rejectName(b.status[i] as number);
        out[k] = (out[k] ?? 0) + 1;
      }
    }
    return out;
  }

  it.skipIf(!HAS_DATA)(`REES46 2019-Oct head: 17,434 events, zero rejects${SKIP_NOTE}`, async () => {
    const map = await readMapFile(path.join(PROJECT_ROOT, 'examples/maps/rees46.json'));
    const { b, stats } = await load(REES46, map, 'Asia/Seoul');
    expect(stats.records).toBe(17_434);
    validateStatic(b, resolveConfig({}), new TypeRegistry()); // default KRW: no currency mapped, so none rejected
    expect(rejectCounts(b)).toEqual({});
    validateStatic(b, cfgUsd, new TypeRegistry());
    const byType = new Map<number, number>();
    let minTs = Infinity;
    let maxTs = -Infinity;
    for (let i = 0; i < b.length; i++) {
      byType.set(b.typeCode[i] as number, (byType.get(b.typeCode[i] as number) ?? 0) + 1);
      minTs = Math.min(minTs, b.ts[i] as number);
      maxTs = Math.max(maxTs, b.ts[i] as number);
    }
    expect(byType.get(EventType.page_view)).toBe(17_055);
    expect(byType.get(EventType.add_to_cart)).toBe(165);
    expect(byType.get(EventType.purchase)).toBe(214);
    expect(minTs).toBe(Date.UTC(2019, 9, 1, 0, 0, 0));
    expect(maxTs).toBeLessThanOrEqual(Date.UTC(2019, 9, 1, 2, 50, 59));
    expect(b.eventId[0]).toBe('2019-Oct_head.csv:2');
    expect(b.userId[0]).toBe('541312140');
    expect(b.amount[0]).toBe(35.79);
    expect(b.props[0]).toEqual({ product_id: '44600062', category_id: '2103807459595387724', brand: 'shiseido', session: '72d76fde-8bb3-4e00-8c23-a032dfed738c' });
    expect(new Set(b.eventId.slice(0, b.length)).size).toBe(b.length);
  });

  it.skipIf(!HAS_DATA)(`CDNOW master: 69,659 purchases by 23,570 customers, zero rejects${SKIP_NOTE}`, async () => {
    const map = await readMapFile(path.join(PROJECT_ROOT, 'examples/maps/cdnow.json'));
    const { b, stats } = await load(CDNOW, map, 'America/New_York');
    expect(stats.records).toBe(69_659);
    validateStatic(b, cfgUsd, new TypeRegistry());
    expect(rejectCounts(b)).toEqual({});
    const users = new Set(b.userId.slice(0, b.length));
    expect(users.size).toBe(23_570);
    let cents = 0;
    let minTs = Infinity;
    let maxTs = -Infinity;
    let purchases = 0;
    for (let i = 0; i < b.length; i++) {
      if (b.typeCode[i] === EventType.purchase) purchases++;
      cents += Math.round((b.amount[i] as number) * 100);
      minTs = Math.min(minTs, b.ts[i] as number);
      maxTs = Math.max(maxTs, b.ts[i] as number);
    }
    expect(purchases).toBe(69_659);
    expect(minTs).toBe(Date.UTC(1997, 0, 1, 5)); // 1997-01-01 00:00 EST
    expect(maxTs).toBe(Date.UTC(1998, 5, 30, 4)); // 1998-06-30 00:00 EDT
    expect(cents).toBeGreaterThan(0);
    expect(b.userId[0]).toBe('00001');
    expect(b.props[0]).toEqual({ cds: '1' });
    expect(b.amount[0]).toBe(11.77);
  });

  it.skipIf(!HAS_DATA)(`CDNOW sample (no header) with an inline map: 6,919 purchases, zero rejects${SKIP_NOTE}`, async () => {
    const map = parseMap({
      _csv: { delimiter: 'whitespace', header: false, columns: ['master_id', 'sample_id', 'date', 'cds', 'dollars'] },
      event_id: { generate: 'line' }, ts: 'date', type: { const: 'purchase' }, user_id: 'master_id', amount: 'dollars',
      props: { cds: 'cds' },
    });
    const { b, stats } = await load(CDNOW_SAMPLE, map);
    expect(stats.records).toBe(6_919);
    validateStatic(b, resolveConfig({}), new TypeRegistry());
    expect(rejectCounts(b)).toEqual({});
    expect(new Set(b.userId.slice(0, b.length)).size).toBe(2_357);
  });
});
