# ollamon: a transparent monitoring proxy for Ollama.
#   docker build -t ollamon .
#   docker run -p 11435:11435 -v ollamon-data:/data --stop-timeout 40 \
#     --add-host=host.docker.internal:host-gateway \
#     -e OLLAMON_UPSTREAM=http://host.docker.internal:11434 ollamon
# --stop-timeout must exceed server.shutdown_grace_s (30 s): on SIGTERM ollamon lets requests finish for up
# to that long, then drains the writer into SQLite. deploy/docker-compose.yml sets stop_grace_period: 40s.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OLLAMON_LISTEN=0.0.0.0:11435 \
    OLLAMON_DB=/data/ollamon.db \
    OLLAMON_CONFIG=/etc/ollamon/config.yaml

# Optional dependency groups of pyproject.toml to include ("" for none): otel enables the OTLP export.
ARG OLLAMON_EXTRAS=otel

WORKDIR /app

# Layer 1, dependencies only: read from pyproject.toml, so a change to the source does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [x.strip() for x in os.environ.get('OLLAMON_EXTRAS', '').split(',') if x.strip()]; \
print('\n'.join(p['dependencies'] + [d for x in extras for d in p['optional-dependencies'][x] \
if not d.startswith('ollamon')]))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Layer 2, the user and its data directory (changes never).
RUN useradd --system --uid 10001 --home-dir /data ollamon \
    && mkdir -p /data /etc/ollamon && chown ollamon /data

# Layer 3, the source: installed without touching the dependencies.
COPY README.md ./
COPY proxy ./proxy
COPY storage ./storage
COPY alerts ./alerts
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY config.yaml /etc/ollamon/config.yaml

USER 10001
VOLUME ["/data"]
EXPOSE 11435
# Readiness: 200 when Ollama answers and the database takes writes (/ollamon/ready needs no token).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:11435/ollamon/ready', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ollamon"]
CMD ["serve"]
