import Kafka from 'node-rdkafka';

/**
 * Produces keyed records to `topic` with an idempotent producer and waits until every one is
 * acknowledged (a full local queue is waited out; bounded: 2,000 tries per record, 30 s flush).
 */
export async function produceAll(bootstrap: string, topic: string, records: readonly { key: string; value: Buffer }[]): Promise<void> {
  const p = new Kafka.Producer({ 'metadata.broker.list': bootstrap, 'linger.ms': 5, 'enable.idempotence': true });
  await new Promise<void>((resolve, reject) => p.connect({}, (e) => (e ? reject(e) : resolve())));
  p.setPollInterval(10);
  for (const r of records) {
    for (let tries = 0; ; tries++) {
      try {
        p.produce(topic, null, r.value, r.key);
        break;
      } catch (err) {
        if (tries > 2000) throw err;
        await new Promise((res) => setTimeout(res, 5));
      }
    }
  }
  await new Promise<void>((resolve, reject) => p.flush(30_000, (e) => (e ? reject(e) : resolve())));
  await new Promise<void>((resolve) => p.disconnect(() => resolve()));
}
