# One image for the Spark master, the workers and the trainer: the project and its venv.
# The dependency layer is built from the install inputs alone, so a code change rebuilds
# only the last COPY, not the environment (Horovod's build takes minutes). The editable install
# maps cxr_pipeline's names onto folders (setup.py's package_dir) that are empty when it runs and
# filled by the last COPY. No JAVA_HOME: its Debian path names the architecture (…-amd64, …-arm64), and
# Spark's launcher (bin/spark-class) runs the `java` on PATH when it is unset; the build checks there is one.
# Maven fetches the Delta jars into the venv's Spark (install/delta_jars.sh).
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven procps build-essential git \
    && rm -rf /var/lib/apt/lists/* \
    && java -version
WORKDIR /opt/cxr
COPY install/ install/
COPY setup.py ./
RUN mkdir -p cxr_pipeline etl/sources training jobs && VENV=/opt/venv bash install/setup_env.sh
COPY . .
# PYSPARK_PYTHON: the venv's interpreter. A driver sends its own to the executors, which start it on spark-worker:
# the same image, so the same path.
ENV PATH=/opt/venv/bin:$PATH \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark
