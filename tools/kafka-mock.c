/*
 * kafka-mock: librdkafka's built-in mock cluster in a process of its own, driven over stdin.
 *
 * Why a C program: the mock cluster speaks the real Kafka protocol, but node-rdkafka exposes only
 * `test.mock.num.brokers`, not the fault API (broker down/up, injected request errors, topics with
 * a chosen partition count). Owning the cluster here also keeps it alive when the engine processes
 * that use it are SIGKILLed. Built on demand by engine/kafka/mock-cluster.ts against the librdkafka
 * that node-rdkafka compiled (headers and shared library from node_modules/node-rdkafka).
 *
 * Usage: kafka-mock BROKERS
 * Prints "bootstrap <host:port,...>" once, then answers one line per command with "ok" or
 * "err <message>":
 *   topic NAME PARTITIONS          create a topic (replication 1)
 *   down BROKER | up BROKER        take a broker off / back on the network
 *   rtt BROKER MS                  add round-trip latency to a broker
 *   errors APIKEY COUNT CODE       fail the next COUNT requests of APIKEY with error CODE
 *   leader TOPIC PARTITION BROKER  move a partition's leadership
 *   quit                           (or end of stdin) destroy the cluster and exit
 */
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void reply(const char *fmt, const char *arg) {
  printf(fmt, arg);
  printf("\n");
  fflush(stdout);
}

int main(int argc, char **argv) {
  int brokers = argc > 1 ? atoi(argv[1]) : 3;
  char errstr[512];
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr));
  rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
  if (!rk) {
    fprintf(stderr, "kafka-mock: rd_kafka_new: %s\n", errstr);
    return 1;
  }
  rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(rk, brokers);
  if (!mc) {
    fprintf(stderr, "kafka-mock: could not create the mock cluster\n");
    return 1;
  }
  /* Consumers join a group at once instead of after the 3 s default (tests start several). */
  rd_kafka_mock_group_initial_rebalance_delay_ms(mc, 0);
  reply("bootstrap %s", rd_kafka_mock_cluster_bootstraps(mc));

  char line[1024];
  while (fgets(line, sizeof(line), stdin)) {
    char a[256] = "", b[256] = "", c[256] = "", cmd[32] = "";
    int n = sscanf(line, "%31s %255s %255s %255s", cmd, a, b, c);
    if (n <= 0) continue;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (!strcmp(cmd, "quit")) {
      break;
    } else if (!strcmp(cmd, "topic") && n == 3) {
      err = rd_kafka_mock_topic_create(mc, a, atoi(b), 1);
    } else if (!strcmp(cmd, "down") && n == 2) {
      err = rd_kafka_mock_broker_set_down(mc, atoi(a));
    } else if (!strcmp(cmd, "up") && n == 2) {
      err = rd_kafka_mock_broker_set_up(mc, atoi(a));
    } else if (!strcmp(cmd, "rtt") && n == 3) {
      err = rd_kafka_mock_broker_set_rtt(mc, atoi(a), atoi(b));
    } else if (!strcmp(cmd, "errors") && n == 4) {
      int count = atoi(b);
      if (count < 1 || count > 1000) {
        reply("err %s", "count must be 1..1000");
        continue;
      }
      rd_kafka_resp_err_t *codes = malloc(sizeof(*codes) * count);
      for (int i = 0; i < count; i++) codes[i] = (rd_kafka_resp_err_t)atoi(c);
      rd_kafka_mock_push_request_errors_array(mc, (int16_t)atoi(a), (size_t)count, codes);
      free(codes);
    } else if (!strcmp(cmd, "leader") && n == 4) {
      err = rd_kafka_mock_partition_set_leader(mc, a, atoi(b), atoi(c));
    } else {
      reply("err unknown command or arguments: %s", cmd);
      continue;
    }
    if (err) reply("err %s", rd_kafka_err2str(err));
    else reply("%s", "ok");
  }
  rd_kafka_mock_cluster_destroy(mc);
  rd_kafka_destroy(rk);
  return 0;
}
