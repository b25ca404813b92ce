# henge-mqtt device sketch for MicroPython (ESP32-class boards) with umqtt.simple.
# Copy to the board as main.py with a config.py defining WIFI_SSID, WIFI_PASSWORD, BROKER_HOST,
# BROKER_PORT, DEVICE_ID and DEVICE_SECRET. Applies each new config version and reports it.
import json
import time

import config as settings
import network
from umqtt.simple import MQTTClient

CONFIG_TOPIC = b"henge/devices/%s/config" % settings.DEVICE_ID.encode()
REPORT_TOPIC = b"henge/devices/%s/report" % settings.DEVICE_ID.encode()
STATE_FILE = "henge_state.json"


def load_version():
    try:
        with open(STATE_FILE) as fh:
            return json.load(fh).get("applied_version", 0)
    except (OSError, ValueError):
        return 0


def save_version(version):
    with open(STATE_FILE, "w") as fh:
        json.dump({"applied_version": version}, fh)


def apply(config):
    # Replace with what the device really does with its config.
    print("applying", config)


def wifi():
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(settings.WIFI_SSID, settings.WIFI_PASSWORD)
        while not wlan.isconnected():
            time.sleep(0.5)


class Device:
    def __init__(self):
        self.applied = load_version()
        self.client = None

    def on_message(self, topic, payload):
        if not payload:
            return
        try:
            snap = json.loads(payload)
            version = snap["version"]
            cfg = snap["config"]
        except (ValueError, KeyError):
            return
        if snap.get("device") != settings.DEVICE_ID or version <= self.applied:
            return  # not ours, or a retained duplicate
        try:
            apply(cfg)
        except Exception as exc:  # report any failure to the operator
            report = {"version": version, "status": "rejected", "error": str(exc)}
        else:
            self.applied = version
            save_version(version)
            report = {"version": version, "status": "applied"}
        self.client.publish(REPORT_TOPIC, json.dumps(report), qos=1)

    def run(self):
        delay = 1
        while True:
            try:
                wifi()
                self.client = MQTTClient(settings.DEVICE_ID, settings.BROKER_HOST, port=settings.BROKER_PORT,
                                         user=settings.DEVICE_ID, password=settings.DEVICE_SECRET, keepalive=60)
                self.client.set_callback(self.on_message)
                self.client.connect()
                self.client.subscribe(CONFIG_TOPIC, qos=1)
                delay = 1
                last_ping = time.time()
                while True:
                    self.client.check_msg()
                    if time.time() - last_ping > 30:
                        self.client.ping()
                        last_ping = time.time()
                    time.sleep(0.2)
            except OSError:
                # back off with jitter so a fleet does not return all at once
                time.sleep(delay + (time.ticks_ms() % 1000) / 1000)
                delay = min(delay * 2, 60)


Device().run()
