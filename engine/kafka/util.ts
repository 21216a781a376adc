/** Small node-rdkafka helpers shared by the changelog, the scale-out runner and the partials reader. */
import type { KafkaConsumer, Message } from 'node-rdkafka';
import { CrmError } from '../errors.js';

/** The value of header `name` of a message, or null. */
export function header(m: Message, name: string): string | null {
  if (m.headers === undefined) return null;
  for (const h of m.headers) {
    const v = h[name];
    if (v !== undefined) return typeof v === 'string' ? v : v.toString('utf8');
  }
  return null;
}

/** How many partitions `topic` has (KAFKA_ERROR when the metadata cannot be read, CONFIG_INVALID when it does not exist). */
export function partitionCount(consumer: KafkaConsumer, topic: string): Promise<number> {
  return new Promise((resolve, reject) => {
    consumer.getMetadata({ topic, timeout: 10_000 }, (err, md) => {
      if (err) return reject(new CrmError('KAFKA_ERROR', `cannot read the metadata of ${topic}`, { cause: err }));
      const t = md.topics.find((x) => x.name === topic);
      if (t === undefined || t.partitions.length === 0) return reject(new CrmError('CONFIG_INVALID', `topic ${topic} does not exist`));
      resolve(t.partitions.length);
    });
  });
}
