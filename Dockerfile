# One image for the Spark master, the workers and the trainer: the project and its venv.
# The dependency layer is built from the install inputs alone, so a code change rebuilds
# only the last COPY, not the environment (Horovod's build takes minutes). The editable install
# maps cxr_pipeline's names onto folders (setup.py's package_dir) that are empty when it runs and
# filled by the last COPY. Maven fetches the Delta jars into the venv's Spark (install/delta_jars.sh).
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven procps build-essential git \
    && rm -rf /var/lib/apt/lists/*
ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64
WORKDIR /opt/cxr
COPY install/ install/
COPY setup.py ./
RUN mkdir -p cxr_pipeline etl/sources training jobs && VENV=/opt/venv bash install/setup_env.sh
COPY . .
ENV PATH=/opt/venv/bin:$PATH \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark
