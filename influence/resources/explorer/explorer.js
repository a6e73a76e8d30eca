/* The report's example explorer (influence report): the glue between the data the report embeds
 * (#explorer-data: column arrays, one entry per pool example) and Tabulator, which draws the table with
 * virtual scrolling and does the sorting and filtering. Here: the columns (each ranking's score, rank and
 * selection as a column group), the filters (ranking, subtask or source, selected), the text search and the
 * panel showing the clicked example whole. window.influenceExplorer keeps the table and readyMs (when its
 * first rows were drawn, in ms from navigation start) for the tests.
 */
(function () {
  "use strict";

  function start() {
    var data = JSON.parse(document.getElementById("explorer-data").textContent);
    var rankings = data.rankings;
    var count = data.id.length;
    var rows = new Array(count);
    for (var i = 0; i < count; i++) {
      var row = {
        i: i, id: data.id[i], source: data.sources[data.source[i]],
        task: data.task[i] < 0 ? "" : data.tasks[data.task[i]], length: data.length[i],
        prompt: data.prompt[i], response: data.response[i],
      };
      for (var k = 0; k < rankings.length; k++) {
        row["s" + k] = rankings[k].score[i];
        row["r" + k] = rankings[k].rank[i];
        row["c" + k] = rankings[k].selected[i] === 1;
      }
      rows[i] = row;
    }
    var main = data.main === null ? 0 : data.main;
    var controls = {
      ranking: document.getElementById("explorer-ranking"),
      group: document.getElementById("explorer-group"),
      selected: document.getElementById("explorer-selected"),
      search: document.getElementById("explorer-search"),
    };
    mainFirst(rankings.length, main).forEach(function (k) {
      controls.ranking.add(new Option(rankings[k].name + " (" + rankings[k].method + ")", String(k)));
    });
    addGroupOptions(controls.group, "subtask", "t", data.tasks);
    addGroupOptions(controls.group, "source", "s", data.sources);

    var table = new Tabulator(document.getElementById("explorer-table"), {
      data: rows,
      index: "i",
      maxHeight: "480px",
      layout: "fitColumns",
      selectableRows: 1,
      placeholder: "no example matches",
      initialSort: rankings.length ? [{column: "r" + main, dir: "asc"}] : [],
      columns: columnsFor(data, main),
    });
    window.influenceExplorer = {table: table, readyMs: null};
    table.on("tableBuilt", function () {
      showCount(table.getDataCount("active"), count);
      (function drawn() {  // ready once the first rows are on screen
        if (!count || document.querySelector("#explorer-table .tabulator-row")) {
          window.influenceExplorer.readyMs = performance.now();
        } else {
          requestAnimationFrame(drawn);
        }
      })();
    });
    table.on("dataFiltered", function (filters, shown) { showCount(shown.length, count); });
    table.on("rowClick", function (event, row) { showExample(data, row.getData().i); });

    var haystack = null;  // every example's id and turns, lower case: built at the first search
    function text(index) {
      if (haystack === null) {
        haystack = new Array(count);
        for (var j = 0; j < count; j++) {
          var turns = data.full[j] ? data.full[j].map(function (turn) { return turn[1]; })
            : [data.prompt[j], data.response[j]];
          haystack[j] = (data.id[j] + "\n" + turns.join("\n")).toLowerCase();
        }
      }
      return haystack[index];
    }

    function applyFilters() {
      var chosen = controls.ranking.value;
      var group = controls.group.value;
      var selected = controls.selected.value;
      var query = controls.search.value.trim().toLowerCase();
      if (!group && !selected && !query) {
        table.clearFilter();
        return;
      }
      var groupKind = group.charAt(0), groupValue = group.slice(2);
      table.setFilter(function (row) {
        if (group && (groupKind === "t" ? row.task : row.source) !== groupValue) return false;
        if (selected) {
          var isSelected = chosen !== "" ? row["c" + chosen] : rankings.some(function (_, k) { return row["c" + k]; });
          if (isSelected !== (selected === "yes")) return false;
        }
        return !query || text(row.i).indexOf(query) >= 0;
      });
    }

    controls.ranking.addEventListener("change", function () {
      var chosen = controls.ranking.value;
      rankings.forEach(function (_, k) {
        ["s", "r", "c"].forEach(function (prefix) {
          if (chosen === "" || chosen === String(k)) table.showColumn(prefix + k); else table.hideColumn(prefix + k);
        });
      });
      table.setSort("r" + (chosen === "" ? main : chosen), "asc");
      applyFilters();
    });
    controls.group.addEventListener("change", applyFilters);
    controls.selected.addEventListener("change", applyFilters);
    var pending = null;
    controls.search.addEventListener("input", function () {
      clearTimeout(pending);
      pending = setTimeout(applyFilters, 150);
    });
  }

  function addGroupOptions(select, label, kind, values) {
    if (!values.length) return;
    var group = document.createElement("optgroup");
    group.label = label;
    values.forEach(function (value) { group.appendChild(new Option(value, kind + ":" + value)); });
    select.appendChild(group);
  }

  function scoreText(cell) {
    var value = cell.getValue();
    return value === null || value === undefined ? "–" : Number(value).toPrecision(4);
  }

  function mainFirst(count, main) {  // the rankings' order in the table and the menu: the main one first
    var order = [];
    for (var k = 0; k < count; k++) if (k !== main) order.push(k);
    return count ? [main].concat(order) : [];
  }

  function columnsFor(data, main) {
    var columns = [
      {title: "id", field: "id", width: 130, frozen: true},
      {title: "source", field: "source", width: 110},
    ];
    if (data.tasks.length) columns.push({title: "subtask", field: "task", width: 110});
    columns.push(
      {title: "chars", field: "length", sorter: "number", hozAlign: "right", width: 80,
        headerTooltip: "response length (characters)"},
      {title: "prompt", field: "prompt", minWidth: 180, widthGrow: 2, headerSort: false},
      {title: "response", field: "response", minWidth: 140, widthGrow: 1, headerSort: false}
    );
    mainFirst(data.rankings.length, main).forEach(function (k) {
      var ranking = data.rankings[k];
      columns.push({title: ranking.name, headerTooltip: ranking.title + "; " + ranking.higher, columns: [
        {title: "score", field: "s" + k, sorter: "number", hozAlign: "right", width: 76, formatter: scoreText},
        {title: "rank", field: "r" + k, sorter: "number", hozAlign: "right", width: 64},
        {title: "sel.", field: "c" + k, sorter: "boolean", hozAlign: "center", width: 62, formatter: "tickCross",
          formatterParams: {crossElement: false}, headerTooltip: "selected by " + ranking.name},
      ]});
    });
    return columns;
  }

  function showCount(shown, count) {
    document.getElementById("explorer-count").textContent = shown + " of " + count + " examples";
  }

  function element(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function showExample(data, i) {
    var panel = document.getElementById("explorer-example");
    panel.replaceChildren();
    panel.appendChild(element("h3", data.id[i]));
    var where = [data.sources[data.source[i]]];
    if (data.task[i] >= 0) where.push("subtask " + data.tasks[data.task[i]]);
    where.push(data.length[i] + " response characters");
    panel.appendChild(element("p", where.join(" · ")));
    var scores = element("table");
    var head = scores.appendChild(element("tr"));
    ["ranking", "score", "rank", "selected"].forEach(function (name) { head.appendChild(element("th", name)); });
    mainFirst(data.rankings.length, data.main === null ? 0 : data.main).forEach(function (k) {
      var ranking = data.rankings[k];
      var line = scores.appendChild(element("tr"));
      var score = ranking.score[i];
      [ranking.name + " (" + ranking.method + ")", score === null ? "–" : String(score),
        ranking.rank[i] === null ? "–" : String(ranking.rank[i]), ranking.selected[i] ? "yes" : "no"]
        .forEach(function (value) { line.appendChild(element("td", value)); });
    });
    panel.appendChild(scores);
    var turns = data.full[i] || [["user", data.prompt[i]], ["assistant", data.response[i]]];
    turns.forEach(function (turn) {
      var block = panel.appendChild(element("div", undefined, "explorer-turn"));
      block.appendChild(element("b", turn[0]));
      block.appendChild(element("pre", turn[1]));
    });
    panel.hidden = false;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
