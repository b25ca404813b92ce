# henge-mqtt in a container: docker build -t henge . && docker run -p 1883:1883 -v henge-data:/data henge
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin henge \
    && mkdir /data && chown henge /data && chmod 0700 /data
WORKDIR /src
COPY pyproject.toml README.md ./
COPY henge_mqtt ./henge_mqtt
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /data
USER henge
VOLUME /data
EXPOSE 1883
# The admin socket is in the data dir: the CLI inside the container needs no credentials.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
    CMD ["henge", "status", "--summary", "--data", "/data"]
ENTRYPOINT ["henge", "serve", "--data", "/data", "--host", "0.0.0.0", "--port", "1883"]
