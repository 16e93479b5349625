#!/usr/bin/env bash
# Fetch the Kafka broker jars (KRaft mode) from Maven Central into the build cache.
source "$(dirname "$0")/lib.sh"
out=$CACHE/kafka-$KAFKA_SCALA_VERSION-$KAFKA_VERSION
if [[ -f $out/.complete ]]; then note "kafka $KAFKA_VERSION cached"; exit 0; fi
command -v mvn >/dev/null || die "Maven (mvn) is not installed (needed to fetch the Kafka jars)"
command -v java >/dev/null || die "Java is not installed (Kafka needs Java 17+)"
rm -rf "$out"; mkdir -p "$out/libs"
run_step "fetch kafka_$KAFKA_SCALA_VERSION $KAFKA_VERSION jars from Maven Central" "$CACHE/logs/fetch-kafka.log" \
  mvn -B -f "$REPO/hack/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" -Dscala.version="$KAFKA_SCALA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$out/libs"
ls "$out/libs"/kafka_"$KAFKA_SCALA_VERSION"-"$KAFKA_VERSION".jar >/dev/null || die "kafka jar missing after fetch"
touch "$out/.complete"
