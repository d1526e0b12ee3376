// The chat page: MQTT over WebSocket for live messages and sending, the
// adapter's JSON API for the room's history and for who is online.
//
// MQTT does not tell a subscriber who published a message; the adapter's
// history does (it stores the publisher's clientid from EMQX's hook), so a
// live message's sender is looked up there, and one's own messages are
// recognised as they come back.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const NAME_RE = /^[A-Za-z0-9_.\-]{1,64}$/;
  const PRESENCE_EVERY_MS = 5000;
  const HISTORY_N = 50;

  const state = {
    settings: null,
    client: null,
    room: null,
    name: null,
    username: null,
    password: null,
    // Payloads this page published and has not yet seen come back.
    mine: [],
    // History ids already shown or given to a live message.
    seen: new Set(),
    presenceTimer: null,
    entering: 0,
  };

  function status(text) {
    $("status").textContent = text;
  }

  function isTopicName(t) {
    return t.length > 0 && t.length <= 65535 && !/[+#\u0000]/.test(t);
  }

  async function api(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      throw new Error(body.message || `HTTP ${r.status}`);
    }
    return body;
  }

  function time(ms) {
    const t = document.createElement("time");
    const d = new Date(ms);
    t.dateTime = d.toISOString();
    t.textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return t;
  }

  function messageItem(from, text, ms, kind) {
    const li = document.createElement("li");
    li.className = kind;
    const who = document.createElement("span");
    who.className = "from";
    who.textContent = from || "someone";
    li.dataset.from = from || "";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = " " + text;
    li.append(time(ms), who, body);
    return li;
  }

  function show(li) {
    const list = $("messages");
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(li);
    if (atEnd) {
      list.scrollTop = list.scrollHeight;
    }
  }

  function notice(text) {
    const li = document.createElement("li");
    li.className = "notice";
    li.textContent = text;
    show(li);
  }

  function payloadText(m) {
    if (typeof m.payload === "string") {
      return m.payload;
    }
    return `(${atob(m.payload_base64 || "").length} bytes of binary data)`;
  }

  async function loadHistory(room, entering) {
    try {
      const h = await api(`/api/v1/history?topic=${encodeURIComponent(room)}&n=${HISTORY_N}`);
      if (entering !== state.entering) {
        return;
      }
      if (h.messages.length === 0) {
        notice(`No messages in ${room} yet.`);
      }
      for (const m of h.messages) {
        if (m.id) {
          state.seen.add(m.id);
        }
        show(messageItem(m.from, payloadText(m), m.timestamp, "history"));
      }
    } catch (e) {
      notice(`History unavailable: ${e.message}`);
    }
  }

  // Finds who published `text` on the room just now, in the history the
  // hook server keeps (written a moment after the message is routed).
  async function lookUpSender(li, room, text) {
    for (const wait of [150, 500, 1500, 4000]) {
      await new Promise((r) => setTimeout(r, wait));
      if (room !== state.room) {
        return;
      }
      try {
        const h = await api(`/api/v1/history?topic=${encodeURIComponent(room)}&n=20`);
        for (let i = h.messages.length - 1; i >= 0; i--) {
          const m = h.messages[i];
          if (m.id && !state.seen.has(m.id) && payloadText(m) === text) {
            state.seen.add(m.id);
            li.dataset.from = m.from;
            li.querySelector(".from").textContent = m.from || "someone";
            return;
          }
        }
      } catch (_) {
        // The next try, or the sender stays unknown.
      }
    }
  }

  function onMessage(topic, payload) {
    if (topic !== state.room) {
      return;
    }
    const text = new TextDecoder().decode(payload);
    const mine = state.mine.indexOf(text);
    if (mine >= 0) {
      state.mine.splice(mine, 1);
      show(messageItem(state.name, text, Date.now(), "live mine"));
      return;
    }
    const li = messageItem("", text, Date.now(), "live");
    li.querySelector(".from").textContent = "…";
    show(li);
    lookUpSender(li, topic, text);
  }

  async function refreshPresence() {
    try {
      const p = await api("/api/v1/presence?limit=1000");
      const list = $("presence");
      list.replaceChildren(
        ...p.clientids.map((id) => {
          const li = document.createElement("li");
          li.textContent = id;
          if (id === state.name) {
            li.className = "me";
          }
          return li;
        })
      );
      $("presence-count").textContent = String(p.total);
    } catch (e) {
      $("presence-count").textContent = "?";
    }
  }

  function enterRoom(room) {
    const client = state.client;
    const old = state.room;
    state.room = room;
    state.entering += 1;
    const entering = state.entering;
    $("room").value = room;
    $("room-name").textContent = room;
    $("messages").replaceChildren();
    const url = new URL(location.href);
    url.searchParams.set("room", room);
    history.replaceState(null, "", url);
    if (old && old !== room && client) {
      client.unsubscribe(old);
    }
    if (!client || !client.connected) {
      return;
    }
    // Subscribed before history is read, so nothing falls between the two.
    client.subscribe(room, { qos: 1 }, (err, granted) => {
      if (err || (granted && granted[0] && granted[0].qos >= 128)) {
        notice(`Not allowed to read ${room}.`);
        return;
      }
      loadHistory(room, entering);
    });
  }

  function wsUrl() {
    if (state.settings.ws_url) {
      return state.settings.ws_url;
    }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.hostname}:8083/mqtt`;
  }

  function connect() {
    if (state.client) {
      state.client.end(true);
    }
    const options = {
      clientId: state.name,
      protocolVersion: 5,
      clean: true,
      reconnectPeriod: 2000,
      connectTimeout: 8000,
    };
    if (state.username) {
      options.username = state.username;
      options.password = state.password;
    }
    status(`Connecting to ${wsUrl()} as ${state.name}…`);
    const client = mqtt.connect(wsUrl(), options);
    state.client = client;
    client.on("connect", () => {
      if (client !== state.client) {
        return;
      }
      status(`Connected as ${state.name}.`);
      $("login").hidden = true;
      $("chat").hidden = false;
      enterRoom(state.room);
      refreshPresence();
    });
    client.on("message", (topic, payload) => {
      if (client === state.client) {
        onMessage(topic, payload);
      }
    });
    client.on("error", (err) => {
      if (client !== state.client) {
        return;
      }
      const refused = /not authori[sz]ed|bad user ?name or password/i.test(err.message || "");
      if (refused && state.settings.login) {
        client.end(true);
        $("chat").hidden = true;
        $("login").hidden = false;
        $("login-error").textContent = "Wrong username or password.";
        status("Not signed in.");
        return;
      }
      status(`Connection problem: ${err.message}`);
    });
    // Another connection took this clientid (the same user in a second
    // tab): stop here rather than take it back and forth every few seconds.
    client.on("disconnect", (packet) => {
      if (client === state.client && packet && packet.reasonCode === 142) {
        client.end(true);
        status(`${state.name} is now connected elsewhere (another tab or device); reload to take it back.`);
      }
    });
    client.on("offline", () => {
      if (client === state.client) {
        status("Disconnected; trying again…");
      }
    });
  }

  // Per tab: two tabs under one name would take the clientid from each
  // other over and over.
  function guestName() {
    const stored = sessionStorage.getItem("chat-name");
    if (stored && NAME_RE.test(stored)) {
      return stored;
    }
    const bytes = crypto.getRandomValues(new Uint8Array(3));
    return "guest-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function wire() {
    $("send-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("text");
      const text = input.value.replace(/[\r\n]+/g, " ").trim();
      if (!text || !state.client || !state.client.connected) {
        return;
      }
      state.mine.push(text);
      state.client.publish(state.room, text, { qos: 1 }, (err) => {
        if (err) {
          notice(`Not sent: ${err.message}`);
        }
      });
      input.value = "";
      input.focus();
    });
    $("room-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const room = $("room").value.trim();
      if (!isTopicName(room)) {
        $("controls-error").textContent = "A room is a topic name, without + or #.";
        return;
      }
      $("controls-error").textContent = "";
      if (room !== state.room) {
        enterRoom(room);
      }
      $("text").focus();
    });
    $("name-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const name = $("name").value.trim();
      if (!NAME_RE.test(name)) {
        $("controls-error").textContent = "A name is 1 to 64 letters, digits, _ . or -.";
        return;
      }
      $("controls-error").textContent = "";
      if (name !== state.name) {
        state.name = name;
        sessionStorage.setItem("chat-name", name);
        connect();
      }
    });
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      state.username = $("login-user").value.trim();
      state.password = $("login-pass").value;
      state.name = state.username;
      $("name").value = state.name;
      $("login-error").textContent = "";
      connect();
    });
  }

  async function start() {
    wire();
    try {
      state.settings = await api("/api/v1/page");
    } catch (e) {
      status(`Cannot load the page settings: ${e.message}`);
      return;
    }
    const asked = new URLSearchParams(location.search).get("room");
    state.room = asked && isTopicName(asked) ? asked : state.settings.room;
    $("room").value = state.room;
    $("room-name").textContent = state.room;
    state.presenceTimer = setInterval(refreshPresence, PRESENCE_EVERY_MS);
    if (state.settings.login) {
      // Names are usernames here; they cannot be changed once signed in.
      $("name-form").hidden = true;
      $("login").hidden = false;
      status("Sign in to chat.");
      $("login-user").focus();
      return;
    }
    state.name = guestName();
    $("name").value = state.name;
    connect();
  }

  start();
})();
