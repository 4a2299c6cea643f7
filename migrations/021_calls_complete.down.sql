DROP TABLE IF EXISTS {db}.calls_complete;
