#!/usr/bin/env bash
# Put the Delta Lake jars that match the venv's delta-spark (and so its pyspark) on that Spark's classpath:
# resolved from Maven Central by the machine's own Maven set-up (mvn, its settings and ~/.m2 cache), then
# copied into pyspark's jars/ folder, so every way this venv starts Spark (a plain `python` session,
# spark-submit, a standalone master and worker started from it) loads them without download or flags.
# What `configure_spark_with_delta_pip` would fetch through Ivy at each session start, fetched once.
#
# Usage: install/delta_jars.sh /path/to/venv/bin/python
set -euo pipefail
PYTHON=${1:?usage: $0 /path/to/venv/bin/python}
read -r DELTA_VERSION SCALA_VERSION JARS < <("$PYTHON" - <<'PY'
from importlib import metadata
from pathlib import Path

import pyspark

jars = Path(pyspark.__file__).parent / "jars"
scala = next(jars.glob("scala-library-*.jar")).name.split("-")[2].rsplit(".", 2)[0]  # 2.13.16 -> 2.13
print(metadata.version("delta-spark"), scala, jars)
PY
)
wanted=("io.delta:delta-spark_${SCALA_VERSION}:${DELTA_VERSION}" "io.delta:delta-storage:${DELTA_VERSION}")
if ls "$JARS"/delta-spark_"${SCALA_VERSION}"-"${DELTA_VERSION}".jar "$JARS"/delta-storage-"${DELTA_VERSION}".jar \
    >/dev/null 2>&1; then
  echo "Delta ${DELTA_VERSION} jars already in $JARS"
  exit 0
fi
if ! command -v mvn >/dev/null; then
  echo "FAILED: mvn not found; the Delta jars come from Maven Central through Maven (apt-get install maven)," \
       "or start Spark with --packages ${wanted[0]}" >&2
  exit 1
fi
rm -f "$JARS"/delta-spark_*.jar "$JARS"/delta-storage-*.jar  # another version's, from an earlier install
for artifact in "${wanted[@]}"; do
  # dependency:copy resolves into ~/.m2 (the cache: a rerun downloads nothing) and copies the jar alone;
  # delta-spark's other dependencies (scala-library, antlr4-runtime) already ship with pyspark.
  if ! output=$(mvn --batch-mode --quiet dependency:copy -Dartifact="${artifact}:jar" -DoutputDirectory="$JARS" \
      -Dmdep.overWriteReleases=true 2>&1); then
    echo "$output" >&2
    echo "FAILED: Maven could not fetch ${artifact} (check mvn's settings.xml and network)" >&2
    exit 1
  fi
done
echo "Delta ${DELTA_VERSION} (Scala ${SCALA_VERSION}) jars copied into $JARS"
